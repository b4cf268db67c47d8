"""`chainproof status CONFIG`: per stage, whether the next run would reuse it, and if not why.

It asks exactly what a run asks (runner/reuse.py), with the spec and materials the next run
would give each stage, and changes nothing on disk: earlier products are re-hashed in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.codedigest import CodeManifest
from pipeline.config import PipelineConfig, StageConfig
from pipeline.hashing import sha256_file
from pipeline.provenance.keys import ENV_PUB, PublicKey, load_public_key
from pipeline.runner import sandbox as sandboxmod
from pipeline.runner.reuse import (
    MATERIAL,
    NO_RUN,
    UNKNOWN,
    UPSTREAM,
    Expected,
    Reason,
    StageReuse,
    Verdict,
)
from pipeline.runner.run import Runner
from pipeline.runner.signing import config_code
from pipeline.workspace import DEPENDENCIES, Workspace


@dataclass(frozen=True)
class StatusReport:
    config: Path
    workspace: Path
    functionary: str | None  # keyid of the key earlier links must verify with
    verdicts: tuple[Verdict, ...]

    def to_json(self) -> dict[str, Any]:
        def reason(r: Reason | None) -> dict[str, Any] | None:
            return None if r is None else {"kind": r.kind, "detail": r.detail, "run": r.run_id}

        return {
            "config": str(self.config),
            "workspace": str(self.workspace),
            "functionary_keyid": self.functionary,
            "stages": [
                {
                    "stage": v.stage,
                    "reusable": v.reusable,
                    "from": v.earlier.record(self.workspace) if v.earlier else None,
                    "reason": None if v.reusable else reason(v.reason),
                    "rejected": [reason(r) for r in v.reasons],
                }
                for v in self.verdicts
            ],
        }


def _functionary(ws: Workspace) -> PublicKey | None:
    """The public key the runner signs links with, as `run` would load it; None when absent."""
    env = os.environ.get(ENV_PUB.format(role="FUNCTIONARY"))
    path = Path(env) if env else ws.keys / "functionary.pub"
    return load_public_key(path) if path.is_file() else None


def stage_status(
    config: PipelineConfig,
    ws: Workspace,
    *,
    sandbox: bool | sandboxmod.Sandbox = True,
    code: CodeManifest | None = None,
) -> StatusReport:
    """What the next `chainproof run CONFIG` in `ws` would reuse, stage by stage. A runner
    that has them passes what it already has: the bubblewrap it found and probed (or whether
    stages run sandboxed), and the code manifest it hashed (config_code)."""
    key = _functionary(ws)
    runner = Runner(config, ws)  # never started: only its spec and lock logic is used
    if key is None:
        none = Reason(NO_RUN, f"no functionary key in {ws.keys}: nothing was signed here yet")
        return StatusReport(
            config.path, ws.root, None, tuple(Verdict(s.name, None, (none,)) for s in config.stages)
        )
    if isinstance(sandbox, sandboxmod.Sandbox):
        box = sandbox
    else:
        box = sandboxmod.find_bubblewrap() if sandbox else sandboxmod.NO_SANDBOX
    reuse = StageReuse(
        ws, run_id=runner.run_id, key=key, code=code if code is not None else config_code(config)
    )
    locks = {f"locks/{p.name}": {"sha256": sha256_file(p)} for p in runner.locks()}
    verdicts: dict[str, Verdict] = {}
    for stage in config.stages:
        spec = runner._spec(stage)
        runner.done.append(stage.name)
        unknown = _not_knowable(stage, verdicts)
        if unknown is not None:
            verdicts[stage.name] = Verdict(stage.name, None, (unknown,))
            continue
        external = {
            param: sandboxmod.resolve_external(value, config.base_dir, [ws.keys])
            for param, value in stage.impl.external_inputs(stage.params).items()
        }
        if external:
            spec["extra"]["external"] = {k: str(v) for k, v in external.items()}
        materials: dict[str, dict[str, str]] = dict(locks)
        for dep in stage.needs:
            earlier = verdicts[dep].earlier
            assert earlier is not None  # _not_knowable refused otherwise
            materials.update(
                {n: dict(d) for n, d in earlier.link.products.items() if n.startswith(f"{dep}/")}
            )
        lock = stage.lock or config.lock
        verdicts[stage.name] = reuse.find(
            Expected(
                stage=stage,
                spec=spec,
                materials=materials,
                lock_sha256=runner.lock_for(lock).sha256,
                sandbox=box.record(network=stage.network),
                external=external,
            )
        )
    return StatusReport(config.path, ws.root, key.keyid, tuple(verdicts.values()))


def _not_knowable(stage: StageConfig, verdicts: dict[str, Verdict]) -> Reason | None:
    """Why the next run's inputs for `stage` cannot be known before it runs, if they cannot."""
    for dep in stage.needs:
        if not verdicts[dep].reusable:
            return Reason(UPSTREAM, f"'{dep}' runs, so its products are not known before it does")
    if stage.params.get("distribution"):
        return Reason(UNKNOWN, "distributed training always runs (its workers' logs are signed)")
    if stage.params.get("base_model"):
        return Reason(
            UNKNOWN, "its base model is fetched and verified when the run starts; run to know"
        )
    if stage.impl.gate and not stage.impl.publishes:
        # its checks are Statements each run signs afresh (the dependency scan carries its
        # start time), so no earlier link consumed the ones the next run will give it
        return Reason(MATERIAL, f"a gate: it decides again on the {DEPENDENCIES} each run signs")
    return None


def render(report: StatusReport) -> list[str]:
    """The table `chainproof status` prints."""
    width = max((len(v.stage) for v in report.verdicts), default=5)
    lines = []
    for v in report.verdicts:
        if v.earlier is not None:
            rec = v.earlier.record(report.workspace)
            lines.append(f"{v.stage:<{width}}  reusable  from run {rec['run_id']} ({rec['link']})")
        else:
            lines.append(f"{v.stage:<{width}}  runs      {v.reason or 'no earlier run'}")
    return lines
