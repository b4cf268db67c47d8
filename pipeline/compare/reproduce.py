"""`chainproof reproduce RUN`: run the recorded pipeline again and compare every product.

Same recorded config (its sha256 is checked), same lock (its sha256 must equal the one every
link of the original recorded), same data (the source stage's pin and products are compared),
same seeds. The result is a signed in-toto Statement with the test-result predicate.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import load_config
from pipeline.errors import InputError, VerificationError
from pipeline.hashing import sha256_file
from pipeline.provenance.links import read_link
from pipeline.provenance.statements import TEST_RESULT, statement
from pipeline.runner.progress import ProgressEvent
from pipeline.runner.run import Runner
from pipeline.workspace import Workspace, read_run_record, workspace_of_run

STATEMENT_NAME = "reproduce.intoto.json"
# Kinds whose products name their own run (run id, release version): compared via upstream.

# Why SavedModel exports are never compared: measured, two exports of one .keras file in fresh
# processes (same PYTHONHASHSEED, op determinism on) differ in every file, since Keras orders
# the export's variables and graph nodes differently each time (and fingerprint.pb hashes
# those). Calling them "identical" would be luck; comparing them would always fail.
NOT_REPRODUCIBLE = (
    "not byte-reproducible (each Keras SavedModel export orders its variables and graph nodes "
    "differently); the weights it serves are compared through model.keras"
)
BOM_NAME = "bom.cdx.json"


@dataclass
class FileComparison:
    name: str
    identical: bool
    detail: str = ""


@dataclass
class StageComparison:
    stage: str
    files: list[FileComparison] = field(default_factory=list)
    skipped: str = ""
    not_compared: list[str] = field(default_factory=list)  # SavedModel export files
    equivalent: list[FileComparison] = field(default_factory=list)  # same content, not bytes

    @property
    def identical(self) -> bool:
        return self.skipped != "" or all(f.identical for f in self.files)

    def notes(self) -> list[str]:
        """What was deliberately not compared, and why (shown and attested alike)."""
        out = []
        if self.skipped:
            out.append(f"{self.stage}: not compared ({self.skipped})")
        if self.not_compared:
            out.append(
                f"{self.stage}: {len(self.not_compared)} SavedModel export file(s) not compared: "
                f"{NOT_REPRODUCIBLE}"
            )
        out += [f"{f.name}: {f.detail}" for f in self.equivalent]
        return out


@dataclass
class ReproduceResult:
    original: str
    reproduction: str
    stages: list[StageComparison]
    statement_path: Path

    @property
    def identical(self) -> bool:
        return all(s.identical for s in self.stages)


def _weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor in a .keras file's weights, read with h5py (no model is built)."""
    import h5py

    with zipfile.ZipFile(path) as zf:
        data = zf.read("model.weights.h5")
    out: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:
        h5.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def compare_keras(a: Path, b: Path) -> str:
    wa, wb = _weights(a), _weights(b)
    if set(wa) != set(wb):
        return f"different tensors: {sorted(set(wa) ^ set(wb))[:5]}"
    diffs = []
    for name in sorted(wa):
        if wa[name].shape != wb[name].shape:
            diffs.append(f"{name}: shape {wa[name].shape} vs {wb[name].shape}")
        elif not np.array_equal(wa[name], wb[name]):
            delta = float(np.max(np.abs(wa[name].astype(np.float64) - wb[name].astype(np.float64))))
            diffs.append(f"{name}: max |diff| {delta:.3g}")
    if not diffs:
        return "same weights; the file differs elsewhere (architecture or metadata)"
    return f"{len(diffs)} of {len(wa)} tensors differ: " + "; ".join(diffs)


def compare_json(a: Path, b: Path) -> str:
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    if not isinstance(ja, dict) or not isinstance(jb, dict):
        return "JSON differs"
    keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))
    return f"JSON keys differ: {', '.join(keys)}"


def compare_file(name: str, a: Path, b: Path) -> FileComparison:
    if sha256_file(a) == sha256_file(b):
        return FileComparison(name, True)
    if name.endswith(".keras"):
        detail = compare_keras(a, b)
    elif name.endswith(".json"):
        detail = compare_json(a, b)
    else:
        detail = f"bytes differ ({a.stat().st_size} vs {b.stat().st_size} bytes)"
    return FileComparison(name, False, detail)


_BOM_LIMIT = 64 << 20


def _bom_content(path: Path) -> Any:
    """A CycloneDX BOM without what differs per build by design: its serialNumber, its
    timestamp, and the digests of SavedModel export files (see NOT_REPRODUCIBLE)."""
    if path.stat().st_size > _BOM_LIMIT:
        raise ValueError(f"larger than {_BOM_LIMIT >> 20} MiB")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    doc.pop("serialNumber", None)
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        meta.pop("timestamp", None)
        model = meta.get("component")
        files = model.get("components") if isinstance(model, dict) else None
        for f in files if isinstance(files, list) else []:
            if isinstance(f, dict) and str(f.get("name", "")).startswith("saved_model/"):
                f.pop("hashes", None)
    return doc


def compare_bom(name: str, a: Path, b: Path) -> FileComparison:
    """Equal content apart from per-build fields is reported as such, never as identical."""
    try:
        ca, cb = _bom_content(a), _bom_content(b)
    except (OSError, ValueError) as e:
        return FileComparison(name, False, f"not a readable BOM: {e}")
    if ca == cb:
        return FileComparison(
            name,
            True,
            "same content; not byte-identical by design (a new serialNumber and timestamp per "
            "build; SavedModel file digests not compared)",
        )
    keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    return FileComparison(name, False, f"BOM content differs in: {', '.join(keys)}")


def compare_runs(old_dir: Path, new_dir: Path) -> list[StageComparison]:
    old_rec, new_rec = read_run_record(old_dir), read_run_record(new_dir)
    old_links = (old_dir / old_rec["links"]).resolve()
    new_links = (new_dir / new_rec["links"]).resolve()
    base = Path(old_rec.get("config_dir") or Path(old_rec["config"]).parent)
    config = load_config(old_dir / "config.yaml", base_dir=base)
    out = []
    for stage in config.stages:
        comp = StageComparison(stage.name)
        out.append(comp)
        if stage.impl.publishes:
            comp.skipped = "its products name the run; what it releases is compared upstream"
            continue
        (old_link,) = old_links.glob(f"{stage.name}.*.link")
        (new_link,) = new_links.glob(f"{stage.name}.*.link")
        old_p, new_p = read_link(old_link).products, read_link(new_link).products
        for name in sorted(set(old_p) | set(new_p)):
            if name not in old_p or name not in new_p:
                where = "original" if name in old_p else "reproduction"
                comp.files.append(FileComparison(name, False, f"only in the {where}"))
            elif "/saved_model/" in name:
                # Not compared even when the digests happen to match (see NOT_REPRODUCIBLE).
                comp.not_compared.append(name)
            elif old_p[name] == new_p[name]:
                comp.files.append(FileComparison(name, True))
            elif name.endswith(f"/{BOM_NAME}"):
                bom = compare_bom(name, old_dir / name, new_dir / name)
                (comp.equivalent if bom.identical else comp.files).append(bom)
            else:
                comp.files.append(compare_file(name, old_dir / name, new_dir / name))
    return out


def reproduce(
    run_dir: Path,
    *,
    on_event: Callable[[str], None] = lambda _m: None,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> ReproduceResult:
    """Re-run a recorded run in its own workspace and compare every product.

    The original must verify first: against the owner key given, else against the owner key
    of the workspace it belongs to (the one the reproduction runs in and signs with)."""
    run_dir = run_dir.resolve()
    record = read_run_record(run_dir)
    if record.get("status") != "succeeded":
        raise InputError(
            f"run {record['run_id']} did not succeed (status {record.get('status')!r})",
            hint="reproduce a completed run",
        )
    # Reproduce only what verifies: a tampered original must not be declared reproducible.
    from pipeline.release.verify import verify_run

    trusted_ws = None if (owner_key or owner_key_file) else workspace_of_run(run_dir).root
    report = verify_run(
        run_dir, owner_key=owner_key, owner_key_file=owner_key_file, workspace=trusted_ws
    )
    recorded = run_dir / "config.yaml"
    signed_config = {link.environment.get("config_sha256") for link in report.links.values()}
    if signed_config != {sha256_file(recorded)}:
        raise VerificationError(
            f"{recorded} is not the config the signed links name",
            check="reproduce",
            artifact=str(recorded),
        )
    base = Path(record.get("config_dir") or Path(record["config"]).parent)
    config = load_config(recorded, base_dir=base)
    pipeline_lock = {
        link.environment.get("lock_sha256")
        for link in report.links.values()
        if link.environment.get("stage_environment") == "pipeline lock"
    }
    want_lock = next(iter(pipeline_lock), None)
    have_lock = sha256_file(config.lock)
    if want_lock != have_lock:
        raise InputError(
            f"the lock changed since run {record['run_id']}: it recorded sha256 {want_lock}, "
            f"{config.lock} now has {have_lock}",
            hint="reproduce needs the same lock; check out the commit the run was made from",
        )
    ws = workspace_of_run(run_dir)
    runner = Runner(config, Workspace(ws.root), on_event=on_event, on_progress=on_progress)
    with runner.session():
        runner.run_stages(config.stages)
        runner.verify_run()
        stages = compare_runs(run_dir, runner.run_dir)
        outcome = ReproduceResult(
            record["run_id"], runner.run_id, stages, runner.links_dir / STATEMENT_NAME
        )
        _attest(outcome, report, config, have_lock, runner)
        runner.finish(
            reproduces=record["run_id"],
            reproduced="identical" if outcome.identical else "different",
        )
    return outcome


def _attest(outcome: ReproduceResult, original, config, lock_sha256: str, runner: Runner) -> None:
    """Subjects are the original run's products as its verified links record them."""
    passed: list[str] = []
    failed: list[str] = []
    warned: list[str] = []
    verified = {
        n: d["sha256"] for link in original.links.values() for n, d in link.products.items()
    }
    subjects: dict[str, str] = {}
    for st in outcome.stages:
        warned += st.notes()
        for f in st.files:
            if f.name in verified:
                subjects[f.name] = verified[f.name]
            (passed if f.identical else failed).append(
                f"{f.name}: identical" if f.identical else f"{f.name}: {f.detail}"
            )
    predicate: dict[str, Any] = {
        "result": "PASSED" if outcome.identical else "FAILED",
        "configuration": [
            {"name": "config", "digest": {"sha256": config.sha256}},
            {"name": config.lock.name, "digest": {"sha256": lock_sha256}},
        ],
        "url": f"chainproof:reproduce/{outcome.original}/{outcome.reproduction}",
        "passedTests": passed,
        "warnedTests": warned,
        "failedTests": failed,
    }
    runner.sign_statement(outcome.statement_path, statement(subjects, TEST_RESULT, predicate))
