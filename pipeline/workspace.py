"""Where generated state lives: runs, per-run links, keys, releases, stage environments."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def keys(self) -> Path:
        return self.root / "attestations" / "keys"

    @property
    def layouts(self) -> Path:
        return self.root / "attestations" / "layouts"

    def links(self, run_id: str) -> Path:
        return self.root / "attestations" / "runs" / run_id

    @property
    def envs(self) -> Path:
        return self.root / ".chainproof" / "envs"


# Every on-disk name of a run or a release bundle, in one place.
RUN_RECORD = "run.json"
LAYOUT_NAME = "root.layout"  # the owner-signed layout, beside the links
PROVENANCE = "provenance.intoto.json"  # SLSA provenance v1, beside the links
SPEC_DIR = "specs"  # one resolved spec per stage, a material of its link
CHECKS_DIR = "checks"  # the runner's signed gate Statements, materials of gate steps
DEPENDENCIES = f"{CHECKS_DIR}/dependencies.intoto.json"
MODELS = f"{CHECKS_DIR}/models.intoto.json"
CANDIDATE = f"{CHECKS_DIR}/candidate.intoto.json"  # the candidate gate's comparison
GATE_CHECKS = (DEPENDENCIES, MODELS)  # what every gate step REQUIREs
INPUTS = "inputs"  # inputs/<stage>/...: what the runner placed for a stage (a base model)
BASE_MODEL = "base_model.keras"
UPSTREAM = "upstream"  # upstream/<stage>/: the release a base model came from
DEFAULT_MODEL = "package/model.keras"  # the model a bundle's consumer loads by default
RELEASE_MANIFEST = "release.intoto.json"  # in a bundle's attestations/: every file, signed
RENEWAL = "renewal.intoto.json"  # in a bundle's attestations/: the owner's later extension


def spec_name(stage: str) -> str:
    """Run-relative name of a stage's spec (the materials of its link include it)."""
    return f"{SPEC_DIR}/{stage}.json"


def base_model_name(stage: str) -> str:
    """Run-relative name of a stage's base model (a material of its link)."""
    return f"{INPUTS}/{stage}/{BASE_MODEL}"


def read_run_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{run_dir} is not a chainproof run (no {RUN_RECORD})",
            hint="pass runs/<run-id>, runs/latest or releases/<name>/<version>",
        ) from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {run_dir / RUN_RECORD}: {e}") from e
    required = ("run_id", "links", "layout", "pipeline", "stages")
    if not isinstance(record, dict) or any(k not in record for k in required):
        raise InputError(
            f"{run_dir / RUN_RECORD} is not a chainproof run record (needs {', '.join(required)})",
            hint="it was edited or truncated; the links and artifacts are the source of truth",
        )
    return record


def workspace_of_run(run_dir: Path) -> Workspace:
    """runs/<id> lives in <workspace>/runs/."""
    return Workspace(run_dir.resolve().parent.parent)
