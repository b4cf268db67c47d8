"""What a run records besides its links: run.json, each stage's spec, the link's fields.

run.json is a convenience for people and tools (status, where things are); it is unsigned and
never trusted by verification. The spec is a material of its stage's link, so what the stage
was told to do is part of the signed chain.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import StageConfig
from pipeline.fsutil import atomic_write_text
from pipeline.provenance.chain import VerifyReport


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class RunRecord:
    """run.json of one run, rewritten atomically on every change."""

    path: Path

    def read(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        return data

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def update(self, **fields: Any) -> None:
        record = self.read()
        record.update(fields)
        self.write(record)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    links_dir: Path
    release_dir: Path | None
    report: VerifyReport | None
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    lineage: str = ""
    reused: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> run and link
    up_to_date: bool = False  # no new run: `run_id` is the earlier run still current


def determinism(stage: StageConfig) -> dict[str, Any]:
    """The kind's reproducibility switches, with `params.<name>` resolved from the stage."""
    switches = dict(stage.impl.determinism)
    for key, value in switches.items():
        if isinstance(value, str) and value.startswith("params."):
            switches[key] = stage.params.get(value.split(".", 1)[1])
    return switches


def byproducts(
    rc: int, logs: dict[str, tuple[str, dict[str, str]]], duration_s: float
) -> dict[str, Any]:
    """The link's byproducts: return value, each log's run-relative path and digest, duration."""
    return {
        "return-value": rc,
        **{which: {"path": name, **digest} for which, (name, digest) in logs.items()},
        "duration_ms": int(duration_s * 1000),
    }
