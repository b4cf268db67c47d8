"""Packaging: the model (.keras and a SavedModel export), a model card, and an ML-BOM.

The model card (JSON and Markdown) names the training data, the input the model accepts,
held-out metrics, training config and environment. The ML-BOM is CycloneDX 1.6 JSON, validated
against the schema on every run: the model as metadata.component (identity, every released
model file, model card), the dataset with `data[]`, and every pinned distribution with the
installed wheel's hash and `dependsOn` edges from the lock. No TensorFlow, no cyclonedx import.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.hashing import list_tree, sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from pipeline.workspace import DATA_MANIFEST
from stages._io import write_json

MODEL, SAVED_MODEL, METRICS = "model.keras", "saved_model/", "metrics.json"
CARD, CARD_MD, BOM = "model_card.json", "model_card.md", "bom.cdx.json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PackageParams(Params):
    intended_use: str = "Demonstration: classify 8x8 grey-scale images of handwritten digits."
    limitations: str = (
        "Trained on a small, clean dataset; not evaluated on real-world handwriting or "
        "adversarial inputs."
    )
    # None: the model's version is derived from its weights' digest ("sha256-<12 hex>").
    version: str | None = None


def _lock_pins(path: Path) -> list[tuple[str, str, list[str]]]:
    """(name, version, sha256 hashes) for every pin of a pip-compile lock."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        parts = line.split()
        hashes = [p.split(":", 1)[1] for p in parts if p.startswith("--hash=sha256:")]
        req = Requirement(" ".join(p for p in parts if not p.startswith("--hash=")))
        (spec,) = list(req.specifier)
        out.append((str(canonicalize_name(req.name)), spec.version, hashes))
    return out


# pip's `--report` of the locked install, kept in the venv by the environment set-up.
INSTALL_REPORT = ".chainproof-install-report.json"
_REPORT_LIMIT = 64 << 20


@dataclass(frozen=True)
class InstalledWheel:
    """The one file a distribution was installed from, and how we know."""

    sha256: str
    source: str  # "pip install report" | "direct_url.json"
    url: str | None = None


def _sha256_of(info: Any) -> str | None:
    """sha256 of a PEP 610 archive_info (`hashes` or the older `hash` form), if well-formed."""
    if not isinstance(info, dict):
        return None
    hashes = info.get("hashes")
    digest = hashes.get("sha256") if isinstance(hashes, dict) else None
    legacy = info.get("hash")
    if digest is None and isinstance(legacy, str) and legacy.startswith("sha256="):
        digest = legacy.split("=", 1)[1]
    if isinstance(digest, str) and len(digest) == 64 and all(c in _HEX for c in digest):
        return digest
    return None


_HEX = frozenset("0123456789abcdef")


def installed_wheels(prefix: Path | None = None) -> dict[tuple[str, str], InstalledWheel]:
    """(name, version) -> the wheel actually installed in this interpreter's environment.

    From pip's install report when the set-up kept one, else from each distribution's
    `direct_url.json` (written for installs from a file or URL). Both are files of the
    environment the stage runs in, so a malformed one is skipped, never trusted blindly:
    a digest is used only when it is also one of the lock's hashes for that pin.
    """
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    out: dict[tuple[str, str], InstalledWheel] = {}
    for dist in distributions():
        try:
            info = json.loads(dist.read_text("direct_url.json") or "null")
        except ValueError:
            continue
        digest = _sha256_of(info.get("archive_info")) if isinstance(info, dict) else None
        if not digest:
            continue
        # METADATA only for the few with a digest: every .metadata access parses the file
        fields = dist.metadata
        name = fields["Name"]
        if isinstance(name, str):
            key = (str(canonicalize_name(name)), fields["Version"])
            out[key] = InstalledWheel(digest, "direct_url.json", str(info.get("url")))
    report = (prefix or Path(sys.prefix)) / INSTALL_REPORT
    try:
        if report.stat().st_size > _REPORT_LIMIT:
            return out
        entries = json.loads(report.read_text()).get("install", [])
    except (OSError, ValueError, AttributeError):
        return out
    for entry in entries if isinstance(entries, list) else []:
        meta = entry.get("metadata") if isinstance(entry, dict) else None
        dl = entry.get("download_info") if isinstance(entry, dict) else None
        if not isinstance(meta, dict) or not isinstance(dl, dict):
            continue
        digest = _sha256_of(dl.get("archive_info"))
        pname, ver = meta.get("name"), meta.get("version")
        if digest and isinstance(pname, str) and isinstance(ver, str):
            url = dl.get("url") if isinstance(dl.get("url"), str) else None
            out[(str(canonicalize_name(pname)), ver)] = InstalledWheel(
                digest, "pip install report", url
            )
    return out


def input_spec(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the model accepts: float32 values of the training data's shape and range (the
    range the train stage measured; serve refuses values outside it)."""
    data = metrics.get("dataset", {})
    spec: dict[str, Any] = {"dtype": "float32"}
    if "input_shape" in data:
        spec["shape"] = list(data["input_shape"])
    rng = data.get("input_range")
    if isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int | float) for v in rng):
        spec["range"] = [float(rng[0]), float(rng[1])]
    return spec


def model_card(
    p: PackageParams, metrics: dict, ctx: StageContext, files: dict, *, version: str
) -> dict:
    return {
        "model": {
            "name": ctx.extra.get("pipeline", "model"),
            "version": version,
            "files": files,
            "formats": {
                "keras": MODEL,
                "tf_saved_model": f"{SAVED_MODEL} (an export of {MODEL} for serving; file "
                "digests in the package link and the provenance)",
            },
            "load": "keras.saving.load_model(path, safe_mode=True) or pipeline.load_verified",
            "architecture": metrics.get("model", {}),
        },
        "input": input_spec(metrics),
        "intended_use": p.intended_use,
        "training_data": metrics["dataset"],
        "metrics": {k: v for k, v in metrics["test"].items() if k != "confusion_matrix"},
        "training_config": metrics["params"],
        "environment": {
            "lock_sha256": ctx.extra.get("lock_sha256"),
            **metrics.get("framework", {}),
        },
        "limitations": p.limitations,
    }


SCREEN_REPORT = "data_screen.json"  # stages/screen.py's report, when a screen stage is upstream


def data_screen_summary(ctx: StageContext) -> dict[str, Any] | None:
    """What the upstream data screen found (verdict, counts by kind), for the model card."""
    hits = [d / SCREEN_REPORT for d in ctx.inputs.values() if (d / SCREEN_REPORT).is_file()]
    if not hits:
        return None
    from pipeline.bounded import read_json

    summary = read_json(hits[0], what="data screen report").get("summary", {})
    return {
        "verdict": str(summary.get("verdict", "unknown")),
        "flagged_rows": summary.get("flagged_rows"),
        "by_kind": summary.get("by_kind", {}),
        "detectors": sorted(summary.get("detectors", {})),
        "note": "heuristic screen: it does not prove the data clean (adaptive attacks evade it)",
    }


def _screen_markdown(card: dict) -> str:
    screened = card.get("data_screen")
    if not screened:
        return "Not screened (no screen stage in the pipeline)."
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(screened["by_kind"].items())) or "none"
    return (
        f"Verdict **{screened['verdict']}**; {screened['flagged_rows']} row(s) flagged "
        f"({kinds}) by {', '.join(screened['detectors'])}. {screened['note']}."
    )


def _files_line(data: dict[str, Any]) -> str:
    files = data.get("source", {}).get("files")
    if files is None:
        return ""
    return f" (the manifest of {files} image files, `{data.get('file')}`)"


def card_markdown(card: dict) -> str:
    m, data, metrics = card["model"], card["training_data"], card["metrics"]
    rows = "\n".join(
        f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['support']} |"
        for c, v in metrics.get("per_class", {}).items()
    )
    files = "\n".join(f"- `{n}` sha256 `{d}`" for n, d in sorted(m["files"].items()))
    env = card["environment"]
    return f"""# Model card: {m["name"]} (version {m["version"]})

## Intended use
{card["intended_use"]}

## Files
{files}

Load only with `keras.saving.load_model(path, safe_mode=True)` after verifying the release
(`pipeline.load_verified` does both).

## Input
{_input_format(card.get("input", {}))} (`chainproof serve` refuses anything else)

## Training data
- name: {data["name"]}
- source: {data["source"].get("location", data["source"])}
- sha256: `{data["sha256"]}`{_files_line(data)}
- split: {data["split"]["train"]} train / {data["split"]["test"]} held out
  (seed {data["split"]["seed"]}, test fraction {data["split"]["test_fraction"]})

## Metrics on the held-out split
- accuracy: {metrics["accuracy"]:.4f}
- loss: {metrics["loss"]:.4f}

| class | precision | recall | support |
| --- | --- | --- | --- |
{rows}

## Training config
```json
{json.dumps(card["training_config"], indent=2, sort_keys=True)}
```

## Environment
- lock sha256: `{env.get("lock_sha256")}`
- TensorFlow {env.get("tensorflow")}, Keras {env.get("keras")}

## Data screen

{_screen_markdown(card)}

## Limitations
{card["limitations"]}
"""


def _sha(digest: str) -> dict[str, str]:
    return {"alg": "SHA-256", "content": digest}


def _pypi_purl(name: str, version: str) -> str:
    return f"pkg:pypi/{quote(name, safe='')}@{quote(version, safe='')}"


def _data_file(data: dict[str, Any]) -> str:
    if data.get("file") == DATA_MANIFEST:
        return f"{DATA_MANIFEST} (the canonical manifest of the image files; shards/ from it)"
    return "dataset.npz (the split the model was trained on)"


def _local_origin(source: dict[str, Any]) -> str:
    if "files" in source:
        return f"an image {source.get('container', 'dataset')} of {source['files']} files"
    return "a local file"


def dataset_uri(source: dict[str, Any]) -> str | None:
    """A portable URI for where the data came from: the URL, or a purl naming the file inside
    the package that bundles it; None for a local file (its path is the builder's, not a URI)."""
    location = str(source.get("location", ""))
    if source.get("kind") == "url":
        return location
    if source.get("kind") == "package":
        # "scikit-learn 1.6.1: sklearn/datasets/data/digits.csv.gz", as the source stage writes
        head, _, inner = location.partition(": ")
        dist, _, ver = head.partition(" ")
        if dist and ver and inner:
            return f"{_pypi_purl(dist, ver)}#{quote(inner)}"
    return None


def _library(
    name: str, version: str, hashes: list[str], wheel: InstalledWheel | None
) -> dict[str, Any]:
    purl = _pypi_purl(name, version)
    comp: dict[str, Any] = {"type": "library", "bom-ref": purl, "name": name, "version": version}
    comp["purl"] = purl
    if wheel is not None and wheel.sha256 in hashes:
        comp["hashes"] = [_sha(wheel.sha256)]
        how = f"the installed wheel's sha256 (from the {wheel.source})"
        if wheel.url and wheel.url.startswith("https://"):
            comp["externalReferences"] = [
                {"type": "distribution", "url": wheel.url, "hashes": [_sha(wheel.sha256)]}
            ]
    else:
        # Without a record of the installed file, the lock's hashes are all we know: listed,
        # and labelled as alternatives rather than as digests of one file.
        comp["hashes"] = [_sha(h) for h in hashes]
        how = (
            f"not identified: these are all {len(hashes)} wheel hashes the lock allows for this "
            "pin (no pip install report or direct_url.json records which one was installed)"
        )
        if wheel is not None:
            how += f"; the recorded install sha256 {wheel.sha256} is not among them"
    comp["properties"] = [{"name": "chainproof:installed-wheel", "value": how}]
    return comp


def _input_format(spec: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in spec.get("shape", [])) or "any shape"
    rng = spec.get("range")
    return f"{spec.get('dtype', 'float32')} {shape}" + (f", values in {rng}" if rng else "")


def ml_bom(
    card: dict[str, Any],
    model_files: dict[str, str],
    locks: list[Path],
    *,
    installed: dict[tuple[str, str], InstalledWheel] | None = None,
    created: str | None = None,
    serial: str | None = None,
) -> str:
    """CycloneDX 1.6 ML-BOM: the model as metadata.component (with every released model file),
    the dataset as a data component with `data[]`, every pinned distribution with the hash of
    the wheel installed, and `dependsOn` edges from the lock's dependency graph."""
    from pipeline.scan.deps import from_lock

    installed = installed or {}
    model_meta, data = card["model"], card["training_data"]
    weights = model_files[MODEL]
    name, version = str(model_meta["name"]), str(model_meta["version"])
    metrics = card["metrics"]
    model: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": "model",
        "name": name,
        "version": version,
        "description": card["intended_use"],
        "hashes": [_sha(weights)],
        # Identity: the name, version and the weights' digest, as a purl consumers can match.
        "purl": f"pkg:generic/{quote(name, safe='')}@{quote(version, safe='')}"
        f"?checksum=sha256:{weights}",
        "components": [
            {"type": "file", "bom-ref": f"model-file:{n}", "name": n, "hashes": [_sha(d)]}
            for n, d in sorted(model_files.items())
        ],
        "modelCard": {
            "modelParameters": {
                "approach": {"type": "supervised"},
                "task": "image-classification",
                "architectureFamily": "convolutional neural network",
                "datasets": [{"ref": "dataset"}],
                "inputs": [{"format": _input_format(card.get("input", {}))}],
                "outputs": [{"format": "class probabilities"}],
            },
            "quantitativeAnalysis": {
                "performanceMetrics": [
                    {
                        "type": "accuracy",
                        "value": f"{metrics['accuracy']:.6f}",
                        "slice": "held-out split",
                    },
                    {"type": "loss", "value": f"{metrics['loss']:.6f}", "slice": "held-out split"},
                ]
            },
            "considerations": {
                "useCases": [card["intended_use"]],
                "technicalLimitations": [card["limitations"]],
            },
        },
    }
    source = data.get("source", {})
    uri = dataset_uri(source)
    split = data.get("split", {})
    contents: dict[str, Any] = {
        "properties": [
            {"name": "chainproof:file", "value": _data_file(data)},
            {"name": "chainproof:origin-sha256", "value": str(source.get("sha256"))},
            {"name": "chainproof:origin-kind", "value": str(source.get("kind"))},
            # an image source: its manifest's digest is origin-sha256; how many files it pins
            *(
                [{"name": "chainproof:files", "value": str(source["files"])}]
                if "files" in source
                else []
            ),
            *({"name": f"chainproof:split:{k}", "value": str(v)} for k, v in sorted(split.items())),
        ]
    }
    if uri:
        contents["url"] = uri
    dataset: dict[str, Any] = {
        "type": "data",
        "bom-ref": "dataset",
        "name": str(data["name"]),
        "hashes": [_sha(data["sha256"])],
        "description": f"training data, from {uri or _local_origin(source)}",
        "data": [
            {
                "type": "dataset",
                "name": str(data["name"]),
                "contents": contents,
                "description": (
                    f"{split.get('train')} training / {split.get('test')} held-out examples "
                    f"(seed {split.get('seed')}, test fraction {split.get('test_fraction')})"
                ),
            }
        ],
    }
    components: dict[str, dict[str, Any]] = {}
    edges: dict[str, set[str]] = {"model": {"dataset"}, "dataset": set()}
    for lock in locks:
        graph = from_lock(lock)
        pins = {n: hashes for n, _, hashes in _lock_pins(lock)}
        for pkg in graph.packages.values():
            ref = _pypi_purl(pkg.name, pkg.version)
            components.setdefault(
                ref,
                _library(
                    pkg.name,
                    pkg.version,
                    pins.get(pkg.name, []),
                    installed.get((pkg.name, pkg.version)),
                ),
            )
            kids = {_pypi_purl(*graph.node(c)) for c in graph.requires.get(pkg.name, ())}
            edges.setdefault(ref, set()).update(kids)
        edges["model"].update(_pypi_purl(*graph.node(r)) for r in graph.roots)
    tool_version = _version("chainproof")
    doc = {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": serial or f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": created or _now(),
            "tools": {
                "components": [
                    {
                        "type": "application",
                        "bom-ref": f"tool:chainproof@{tool_version}",
                        "name": "chainproof",
                        "version": tool_version,
                        "purl": _pypi_purl("chainproof", tool_version),
                    }
                ]
            },
            "component": model,
        },
        "components": [dataset, *(components[k] for k in sorted(components))],
        "dependencies": [
            {"ref": ref, "dependsOn": sorted(kids)} if kids else {"ref": ref}
            for ref, kids in sorted(edges.items())
        ],
    }
    text = json.dumps(doc, indent=2, sort_keys=True)
    errors = validate_bom(doc)
    if errors:
        raise StageError(
            "the ML-BOM does not validate against CycloneDX 1.6: " + "; ".join(errors[:5]),
            hint="this is a bug in the package stage; report it with the stage log",
        )
    return text + "\n"


# RFC 3987 excludes these from an IRI reference: controls, space, <>"{}|\^` and a bare "%".
_IRI_BAD = re.compile(r'[\x00-\x20<>"{}|\\^`\x7f-\x9f]|%(?![0-9A-Fa-f]{2})')
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


def _is_iri_reference(value: object) -> bool:
    """The IRI-reference syntax check the schema's `format` asks for, without rfc3987_syntax:
    no excluded characters, well-formed percent escapes, and a valid scheme when one is given."""
    if not isinstance(value, str):
        return True
    if _IRI_BAD.search(value):
        return False
    head = re.split(r"[/?#]", value, maxsplit=1)[0]
    return ":" not in head or bool(_SCHEME.match(head.split(":", 1)[0]))


@functools.cache
def _bom_validator() -> Any:
    """A Draft 7 validator of the CycloneDX 1.6 schema that cyclonedx-python-lib bundles (the
    schema its strict validator uses, with the same SPDX and JSF sub-schemas), built once.

    Why not JsonStrictValidator: importing jsonschema with rfc3987_syntax installed builds a
    Lark grammar at import (about 1.2 s, most of the stage's run). Here rfc3987_syntax is kept
    out of the import, and the one format it serves (`iri-reference`) is checked by
    `_is_iri_reference`; tests also validate with JsonStrictValidator.
    """
    if "jsonschema" not in sys.modules and "rfc3987_syntax" not in sys.modules:
        sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # makes its import fail
        try:
            import jsonschema  # noqa: F401
        finally:
            del sys.modules["rfc3987_syntax"]
    from importlib.util import find_spec

    from jsonschema import Draft7Validator, FormatChecker
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    spec = find_spec("cyclonedx")  # the package's location, without importing the library
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            "cyclonedx-python-lib is not installed; it supplies the CycloneDX 1.6 schema",
            hint="the stage's lock must include cyclonedx-python-lib",
        )
    res = Path(next(iter(spec.submodule_search_locations))) / "schema" / "_res"

    def load(name: str) -> Any:
        return json.loads((res / name).read_text())

    prefix = "http://cyclonedx.org/schema/"
    registry: Registry[Any] = Registry().with_resources(
        (f"{prefix}{name}", Resource.from_contents(load(name), default_specification=DRAFT7))
        for name in (
            "spdx.SNAPSHOT.schema.json",
            "jsf-0.82.SNAPSHOT.schema.json",
            "cryptography-defs.SNAPSHOT.schema.json",
        )
    )
    checker = FormatChecker()
    if "iri-reference" not in checker.checkers:
        checker.checks("iri-reference")(_is_iri_reference)
    return Draft7Validator(
        load("bom-1.6.SNAPSHOT.schema.json"), registry=registry, format_checker=checker
    )


def validate_bom(doc: Any) -> list[str]:
    """Every CycloneDX 1.6 schema error of `doc` (empty: valid), each naming where it is."""
    errors = sorted(_bom_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}" for e in errors]


class PackageStage(Stage):
    kind = "package"
    Params = PackageParams
    outputs = (MODEL, SAVED_MODEL, METRICS, CARD, CARD_MD, BOM)
    model_output = MODEL

    def run(self, ctx: StageContext) -> None:
        p: PackageParams = ctx.params
        shutil.copyfile(ctx.find_input(MODEL), ctx.output(MODEL))
        shutil.copyfile(ctx.find_input(METRICS), ctx.output(METRICS))
        exported = ctx.find_input("saved_model/saved_model.pb").parent
        shutil.copytree(exported, ctx.output(SAVED_MODEL))
        weights = sha256_file(ctx.output(MODEL))
        # The card names the .keras file only: it is what load_verified loads, and the card
        # must not change with the SavedModel export, which is not byte-reproducible (its
        # digests are in the BOM, the signed package link and the SLSA provenance).
        files = {MODEL: weights}
        released = {
            **files,
            **{
                f"{SAVED_MODEL}{name}": sha256_file(path)
                for name, path in list_tree(ctx.output(SAVED_MODEL)).items()
            },
        }
        metrics: dict[str, Any] = json.loads(ctx.output(METRICS).read_text())
        card = model_card(p, metrics, ctx, files, version=p.version or f"sha256-{weights[:12]}")
        screened = data_screen_summary(ctx)
        if screened is not None:
            card["data_screen"] = screened
        write_json(ctx.output(CARD), card)
        ctx.output(CARD_MD).write_text(card_markdown(card))
        locks = [ctx.workdir / rel for rel in ctx.extra.get("locks", [])]
        ctx.output(BOM).write_text(ml_bom(card, released, locks, installed=installed_wheels()))


if __name__ == "__main__":
    raise SystemExit(main(PackageStage))
