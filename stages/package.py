"""Packaging: the model (.keras and a SavedModel export), a model card, and an ML-BOM.

The model card (JSON and Markdown) names the training data, held-out metrics, training config
and environment. The ML-BOM is CycloneDX 1.6 JSON built with cyclonedx-python-lib: the model
as a machine-learning-model component (hashes, model card), the dataset as a data component,
and every Python distribution of the lock with its version, purl and hashes (every file the
lock allows). Where the environment kept pip's install report (a wheels-only build does), each
library also names the wheel actually installed and its sha256, in `chainproof:installed-from`
and `chainproof:installed-sha256` properties. No TensorFlow.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.envcheck import InstalledFile, read_install_report
from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import write_json

MODEL, SAVED_MODEL, METRICS = "model.keras", "saved_model/", "metrics.json"
CARD, CARD_MD, BOM = "model_card.json", "model_card.md", "bom.cdx.json"


class PackageParams(Params):
    intended_use: str = "Demonstration: classify 8x8 grey-scale images of handwritten digits."
    limitations: str = (
        "Trained on a small, clean dataset; not evaluated on real-world handwriting or "
        "adversarial inputs."
    )
    version: str = "0"


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


def model_card(p: PackageParams, metrics: dict, ctx: StageContext, files: dict) -> dict:
    return {
        "model": {
            "name": ctx.extra.get("pipeline", "model"),
            "version": p.version,
            "files": files,
            "formats": {
                "keras": MODEL,
                "tf_saved_model": f"{SAVED_MODEL} (an export of {MODEL} for serving; file "
                "digests in the package link and the provenance)",
            },
            "load": "keras.saving.load_model(path, safe_mode=True) or pipeline.load_verified",
            "architecture": metrics.get("model", {}),
        },
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

## Training data
- name: {data["name"]}
- source: {data["source"].get("location", data["source"])}
- sha256: `{data["sha256"]}`
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

## Limitations
{card["limitations"]}
"""


def ml_bom(
    card: dict,
    model_files: dict[str, str],
    locks: list[Path],
    installed: dict[tuple[str, str], InstalledFile] | None = None,
) -> str:
    """CycloneDX 1.6 ML-BOM; the library has no model-card type yet, so the card is added to
    the serialised model component and the whole document is schema-validated."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from packageurl import PackageURL

    def sha(d: str) -> HashType:
        return HashType(alg=HashAlgorithm.SHA_256, content=d)

    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=card["model"]["name"],
        version=card["model"]["version"],
        bom_ref="model",
        hashes=[sha(model_files[MODEL])],
        description=card["intended_use"],
    )
    data = card["training_data"]
    dataset = Component(
        type=ComponentType.DATA,
        name=data["name"],
        bom_ref="dataset",
        hashes=[sha(data["sha256"])],
        description=f"source: {data['source'].get('location', '')}",
    )
    bom = Bom(components=[model, dataset])
    for lock in locks:
        for name, version, hashes in _lock_pins(lock):
            wheel = (installed or {}).get((name, version))
            props = (
                [
                    Property(name="chainproof:installed-from", value=wheel.filename),
                    Property(name="chainproof:installed-sha256", value=wheel.sha256),
                ]
                if wheel
                else []
            )
            bom.components.add(
                Component(
                    type=ComponentType.LIBRARY,
                    name=name,
                    version=version,
                    bom_ref=f"pypi:{name}@{version}",
                    purl=PackageURL(type="pypi", name=name, version=version),
                    hashes=[sha(h) for h in hashes],
                    properties=props,
                )
            )
    bom.register_dependency(model, [dataset])
    doc = json.loads(JsonV1Dot6(bom).output_as_string())
    doc.pop("serialNumber", None)  # random per call; the BOM's identity is its sha256
    doc.get("metadata", {}).pop("timestamp", None)
    for comp in doc["components"]:
        if comp.get("bom-ref") == "model":
            metrics = card["metrics"]
            comp["modelCard"] = {
                "modelParameters": {
                    "approach": {"type": "supervised"},
                    "task": "image-classification",
                    "architectureFamily": "convolutional neural network",
                    "datasets": [{"ref": "dataset"}],
                },
                "quantitativeAnalysis": {
                    "performanceMetrics": [
                        {
                            "type": "accuracy",
                            "value": f"{metrics['accuracy']:.6f}",
                            "slice": "held-out split",
                        },
                        {
                            "type": "loss",
                            "value": f"{metrics['loss']:.6f}",
                            "slice": "held-out split",
                        },
                    ]
                },
                "considerations": {
                    "useCases": [card["intended_use"]],
                    "technicalLimitations": [card["limitations"]],
                },
            }
    text = json.dumps(doc, indent=2, sort_keys=True)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise StageError(f"the ML-BOM does not validate against CycloneDX 1.6: {error}")
    return text + "\n"


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
        # Only the .keras file's digest: SavedModel exports embed per-export ids, so listing
        # their digests would make the card differ between byte-identical trainings. Their
        # digests are in the signed package link and in the SLSA provenance.
        files = {MODEL: sha256_file(ctx.output(MODEL))}
        metrics: dict[str, Any] = json.loads(ctx.output(METRICS).read_text())
        card = model_card(p, metrics, ctx, files)
        write_json(ctx.output(CARD), card)
        ctx.output(CARD_MD).write_text(card_markdown(card))
        locks = [ctx.workdir / rel for rel in ctx.extra.get("locks", [])]
        # This stage runs in the locked environment: its install report names the wheels.
        installed = read_install_report(Path(sys.prefix))
        ctx.output(BOM).write_text(ml_bom(card, files, locks, installed))


if __name__ == "__main__":
    raise SystemExit(main(PackageStage))
