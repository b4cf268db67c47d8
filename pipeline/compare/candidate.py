"""The candidate gate: an update reaches production only if it breaks nothing and opens no hole.

`chainproof candidate CONFIG [--lock NEW_LOCK]` runs the pipeline up to (not including) its
deploy gate into a candidate run — with the new lock, every stage runs in an environment built
from it — then compares the candidate with what production serves (the release the MLflow
`production` alias points at, else the newest release bundle):

- no new vulnerability at or above the threshold (the dependency gate already refused
  violations; this catches what the candidate adds that production did not have);
- held-out accuracy drops by at most `accuracy_drop`; no class's recall by more than
  `recall_drop`;
- on the candidate's held-out split, the two models agree on at least `agreement` of the
  predictions (both loaded with safe_mode, production through `load_verified`);
- a changed base model must itself carry a verified chain (a release bundle).

The comparison is a signed in-toto Statement (test-result predicate) bound to both model
digests, at `checks/candidate.intoto.json` — a material the deploy step REQUIREs in a
candidate run, and which deploy re-checks. Only a passing candidate is deployed, and only on
request; nothing in production changes otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import bounded
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import InputError, VerificationError
from pipeline.provenance.statements import TEST_RESULT, statement
from pipeline.runner.progress import ProgressEvent
from pipeline.runner.run import Runner
from pipeline.workspace import CANDIDATE, CHECKS_DIR, DATA_MANIFEST, SHARDS_DIR, Workspace

SEVERITY_ORDER = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Criterion:
    name: str
    passed: bool
    detail: str


@dataclass
class CandidateResult:
    run_id: str
    run_dir: Path
    production: Path
    criteria: list[Criterion]
    diff_table: str
    statement_path: Path
    release: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)


def production_release(config: PipelineConfig, ws: Workspace) -> Path:
    """The release production serves: MLflow's `production` alias, else the newest bundle."""
    releases = ws.root / config.release_dir / config.name
    by_alias = _release_of_alias(config, ws)
    if by_alias is not None:
        return by_alias
    latest = releases / "latest"
    if latest.exists():
        return latest.resolve()
    raise InputError(
        f"there is no production release of '{config.name}' to compare with ({releases})",
        hint="run the pipeline once (make train) to create the first release",
    )


def _release_of_alias(config: PipelineConfig, ws: Workspace) -> Path | None:
    if not config.lineage.enabled:
        return None
    try:
        from mlflow import MlflowClient

        from pipeline.lineage import DEFAULT_TRACKING_URI, resolve_tracking_uri

        uri = resolve_tracking_uri(config.lineage.tracking_uri or DEFAULT_TRACKING_URI, ws.root)
        name = config.lineage.registered_model or config.name
        mv = MlflowClient(uri).get_model_version_by_alias(name, "production")
        run_id = mv.tags.get("chainproof.run_id")
        if not run_id:
            return None
        record = json.loads((ws.runs / run_id / "run.json").read_text())
        if not record.get("release"):
            return None
        release = ws.root / config.release_dir / config.name / Path(record["release"]).name
        return release if release.is_dir() else None
    except Exception:  # no store, no alias, an unreachable server: fall back to the bundles
        return None


def _with_lock(config: PipelineConfig, lock: Path) -> PipelineConfig:
    """Every stage runs in the environment built from `lock` (the runner keeps its own)."""
    if not lock.is_file():
        raise InputError(f"candidate lock {lock} does not exist")
    stages = tuple(dataclasses.replace(s, lock=lock.resolve()) for s in config.stages)
    return dataclasses.replace(config, stages=stages)


def _held_out(run_dir: Path):
    import numpy as np

    source = run_dir / "source"
    if not (source / "dataset.npz").is_file() and (source / DATA_MANIFEST).is_file():
        # an image source: the held-out split is its test shards (uint8; the model sees /scale)
        manifest = bounded.read_json(source / "manifest.json", what="dataset manifest")
        shards = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(shards, list):
            raise InputError(f"{source / 'manifest.json'} lists no shards")
        xs, ys = [], []
        for s in shards:
            name = str(s.get("file", "")) if isinstance(s, dict) else ""
            if not name.startswith("test-") or "/" in name or not name.endswith(".npz"):
                continue
            with np.load(source / SHARDS_DIR / name, allow_pickle=False) as d:
                xs.append(d["x"].astype(np.float32) / np.float32(manifest["scale"]))
                ys.append(d["y"])
        if not xs:
            raise InputError(f"{source / 'manifest.json'} lists no held-out shard")
        return np.concatenate(xs), np.concatenate(ys)
    with np.load(source / "dataset.npz", allow_pickle=False) as d:
        return d["x_test"], d["y_test"]


def _load_keras_bytes(data: bytes):
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        return keras.saving.load_model(path, safe_mode=True)


def _candidate_model_bytes(runner: Runner) -> bytes:
    """The candidate's packaged model, checked against its signed package link."""
    from pipeline.provenance.links import link_filename, read_link

    gate = runner.gates()[0] if runner.gates() else None
    before_gate = runner.config.stages[: runner.config.stages.index(gate)] if gate else ()
    package = [s for s in before_gate or runner.config.stages if s.impl.model_output][-1]
    link = read_link(
        runner.links_dir / link_filename(package.name, runner.functionary.public.keyid)
    )
    name = f"{package.name}/{package.impl.model_output}"
    data = (runner.run_dir / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != link.products[name]["sha256"]:
        raise VerificationError(f"{name} changed after it was attested", check="candidate")
    return data


def evaluate(
    prod_bundle: Path,
    owner_key: str | None,
    owner_key_file: Path | None,
    runner: Runner,
    policy: dict[str, Any],
    diff,
    metrics: tuple[dict[str, Any], dict[str, Any]],
) -> tuple[list[Criterion], dict[str, str]]:
    """`metrics` are the held-out `test` blocks of (production, candidate)."""
    from pipeline.release.loading import read_verified_bytes
    from pipeline.scan.model import UnsafeModelError, scan_path

    criteria: list[Criterion] = []
    threshold = SEVERITY_ORDER.index(policy["severity"])
    new = [
        v
        for v in diff.vulnerabilities.new
        if v.severity not in SEVERITY_ORDER or SEVERITY_ORDER.index(v.severity) >= threshold
    ]
    vulns = diff.vulnerabilities
    if not vulns.compared:
        # Not compared is not "none new": say so, and refuse when scans are required.
        required = bool(policy.get("dependencies_required"))
        criteria.append(
            Criterion(
                "no new vulnerability",
                not required,
                f"NOT compared: {', '.join(vulns.not_scanned) or 'a side'} not scanned"
                + (
                    " (security.dependencies.required is true)"
                    if required
                    else " (allowed: security.dependencies.required is false)"
                ),
            )
        )
    else:
        criteria.append(
            Criterion(
                "no new vulnerability",
                not new,
                "none at or above " + policy["severity"]
                if not new
                else "; ".join(
                    f"{v.id} {v.package} {v.b_version} ({v.severity}): "
                    f"{v.paths[0] if v.paths else ''}"
                    for v in new
                ),
            )
        )

    ma, mb = metrics  # A = production, B = candidate
    a_acc, b_acc = ma.get("accuracy"), mb.get("accuracy")
    if a_acc is None or b_acc is None:
        criteria.append(Criterion("accuracy", False, "held-out accuracy missing on one side"))
    else:
        drop = a_acc - b_acc
        criteria.append(
            Criterion(
                "accuracy",
                drop <= policy["accuracy_drop"],
                f"{a_acc:.4f} -> {b_acc:.4f} ({-drop:+.4f}; "
                f"allowed drop {policy['accuracy_drop']})",
            )
        )
    worst = None
    for cls, pc in (ma.get("per_class") or {}).items():
        cand = (mb.get("per_class") or {}).get(cls)
        if cand is None:
            continue
        d = pc["recall"] - cand["recall"]
        if worst is None or d > worst[1]:
            worst = (cls, d, pc["recall"], cand["recall"])
    if worst is None:
        criteria.append(Criterion("per-class recall", False, "per-class recall missing"))
    else:
        cls, d, ra, rb = worst
        criteria.append(
            Criterion(
                "per-class recall",
                d <= policy["recall_drop"],
                f"worst class {cls}: {ra:.4f} -> {rb:.4f} ({-d:+.4f}; "
                f"allowed drop {policy['recall_drop']})",
            )
        )

    # production is this workspace's own release: its owner key is trusted unless one is given
    prod_bytes, _ = read_verified_bytes(
        prod_bundle,
        owner_key=owner_key,
        owner_key_file=owner_key_file or (None if owner_key else runner.ws.keys / "owner.pub"),
        freshness=False,  # production is compared with, not loaded into service
    )
    cand_bytes = _candidate_model_bytes(runner)
    for data in (prod_bytes, cand_bytes):  # both scanned before Keras sees either
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "model.keras"
            p.write_bytes(data)
            report = scan_path(p)
            if not report.ok():
                raise UnsafeModelError(report)
    x, _ = _held_out(runner.run_dir)
    import numpy as np

    pa = np.argmax(_load_keras_bytes(prod_bytes).predict(x, verbose=0), axis=1)
    pb = np.argmax(_load_keras_bytes(cand_bytes).predict(x, verbose=0), axis=1)
    agreement = float(np.mean(pa == pb))
    criteria.append(
        Criterion(
            "prediction agreement",
            agreement >= policy["agreement"],
            f"{agreement:.4f} of {len(x)} held-out predictions agree "
            f"(required {policy['agreement']})",
        )
    )

    base_changed = diff.base_model.changed
    train_links = [
        link for link in runner.chain_links().values() if link.environment.get("base_model")
    ]
    unverified = [
        lk.environment["base_model"]["location"]
        for lk in train_links
        if lk.environment["base_model"].get("kind") != "bundle"
    ]
    criteria.append(
        Criterion(
            "base model lineage",
            not (base_changed and unverified),
            "unchanged"
            if not base_changed
            else (
                "changed, and every base model came from a verified release"
                if not unverified
                else f"changed to a model without a verified chain: {unverified}"
            ),
        )
    )
    digests = {
        "production/model.keras": hashlib.sha256(prod_bytes).hexdigest(),
        "candidate/model.keras": hashlib.sha256(cand_bytes).hexdigest(),
    }
    return criteria, digests


def run_candidate(
    config_path: Path,
    ws: Workspace,
    *,
    lock: Path | None = None,
    against: Path | None = None,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    deploy: bool = False,
    on_event: Callable[[str], None] = lambda _m: None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> CandidateResult:
    from pipeline.compare.diff import diff as lineage_diff
    from pipeline.compare.diff import load_lineage, render_table

    config = load_config(config_path)
    if lock is not None:
        config = _with_lock(config, lock)
    production = (against or production_release(config, ws)).resolve()
    on_event(f"candidate of '{config.name}' against production release {production}")

    runner = Runner(config, ws, on_event=on_event, candidate=True, on_progress=on_progress)
    with runner.session():
        gates = runner.gates()
        first_gate = config.stages.index(gates[0]) if gates else len(config.stages)
        runner.run_stages(config.stages[:first_gate])
        prod_lineage, cand_lineage = load_lineage(production), load_lineage(runner.run_dir)
        d = lineage_diff(prod_lineage, cand_lineage)
        policy: dict[str, Any] = config.candidate.model_dump(exclude_none=True)
        policy.setdefault("severity", config.security.dependencies.severity)
        policy["dependencies_required"] = config.security.dependencies.required
        criteria, digests = evaluate(
            production,
            owner_key,
            owner_key_file,
            runner,
            policy,
            d,
            (dict(prod_lineage.metrics), dict(cand_lineage.metrics)),
        )
        passed = all(c.passed for c in criteria)
        stmt = statement(
            digests,
            TEST_RESULT,
            {
                "result": "PASSED" if passed else "FAILED",
                "configuration": [
                    {
                        "name": "policy",
                        "digest": {
                            "sha256": hashlib.sha256(
                                json.dumps(policy, sort_keys=True).encode()
                            ).hexdigest()
                        },
                    },
                    {"name": "config", "digest": {"sha256": config.sha256}},
                ],
                "url": f"chainproof:candidate/{runner.run_id}/against/{production.name}",
                "passedTests": [f"{c.name}: {c.detail}" for c in criteria if c.passed],
                "warnedTests": [],
                "failedTests": [f"{c.name}: {c.detail}" for c in criteria if not c.passed],
            },
        )
        path = runner.run_dir / CANDIDATE
        runner.sign_statement(path, stmt)
        result = CandidateResult(
            runner.run_id, runner.run_dir, production, criteria, render_table(d), path
        )
        runner.finish(
            status="candidate " + ("passed" if passed else "blocked"),
            candidate={"against": str(production), "passed": passed},
        )
        if passed and deploy:
            runner.run_stages(config.stages[first_gate:])
            runner.verify_run()
            result.release = runner.publish_release()
            runner.finish(status="succeeded", release=str(result.release))
    return result


def render(result: CandidateResult) -> str:
    out = io.StringIO()
    out.write(f"candidate run {result.run_id} against production {result.production.name}\n\n")
    out.write(result.diff_table.rstrip() + "\n\n")
    for c in result.criteria:
        out.write(f"  {'pass' if c.passed else 'FAIL'}  {c.name:<22} {c.detail}\n")
    out.write(f"\nstatement: {result.statement_path}\n")
    if result.release:
        out.write(f"deployed:  {result.release}\n")
    verdict = "PASSED" if result.passed else "BLOCKED"
    out.write(
        f"verdict: {verdict}"
        + (
            ""
            if result.release or not result.passed
            else " (not deployed: pass --deploy to release it)"
        )
        + "\n"
    )
    return out.getvalue()


__all__ = ["CHECKS_DIR", "CandidateResult", "render", "run_candidate"]
