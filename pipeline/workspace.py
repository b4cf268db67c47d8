"""Where generated state lives: runs, per-run links, keys, releases, stage environments."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import bounded
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


# A run id: its UTC start time, then six hex digits (runs/<id>/, releases/<name>/<id>/).
RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")

# Every on-disk name of a run or a release bundle, in one place.
RUN_RECORD = "run.json"
LAYOUT_NAME = "root.layout"  # the owner-signed layout, beside the links
PROVENANCE = "provenance.intoto.json"  # SLSA provenance v1, beside the links
SPEC_DIR = "specs"  # one resolved spec per stage, a material of its link
CHECKS_DIR = "checks"  # the runner's signed gate Statements, materials of gate steps
DEPENDENCIES = f"{CHECKS_DIR}/dependencies.intoto.json"
MODELS = f"{CHECKS_DIR}/models.intoto.json"
CANDIDATE = f"{CHECKS_DIR}/candidate.intoto.json"  # the candidate gate's comparison
DATA = f"{CHECKS_DIR}/data.intoto.json"  # the data screen's verdict (a config with a screen)
GATE_CHECKS = (DEPENDENCIES, MODELS)  # what every gate step REQUIREs
INPUTS = "inputs"  # inputs/<stage>/...: what the runner placed for a stage (a base model)
BASE_MODEL = "base_model.keras"
UPSTREAM = "upstream"  # upstream/<stage>/: the release a base model came from
# Directories the runner keeps in runs/<id>/ beside the stages' own: no stage may be named
# so (its working directory would be one of them, and the layout's inspection tells the
# stages' files from the runner's by these names).
RUN_DIRS = (SPEC_DIR, CHECKS_DIR, "locks", "keys", "logs", "tmp", INPUTS, UPSTREAM)
DEFAULT_MODEL = "package/model.keras"  # the model a bundle's consumer loads by default
RELEASE_MANIFEST = "release.intoto.json"  # in a bundle's attestations/: every file, signed
RENEWAL = "renewal.intoto.json"  # in a bundle's attestations/: the owner's later extension
# A source stage's products for a dataset of image files: its canonical manifest (the bytes
# whose sha256 the config pins) and the decoded images in .npz shards.
DATA_MANIFEST = "data-manifest.json"
SHARDS_DIR = "shards/"


def spec_name(stage: str) -> str:
    """Run-relative name of a stage's spec (the materials of its link include it)."""
    return f"{SPEC_DIR}/{stage}.json"


def base_model_name(stage: str) -> str:
    """Run-relative name of a stage's base model (a material of its link)."""
    return f"{INPUTS}/{stage}/{BASE_MODEL}"


# run.json's fields and the JSON types a reader may rely on. It is unsigned (verification
# never trusts it), but tools read it, so a wrong type is bad input naming the field.
_TEXT, _LIST, _OBJECT, _TEXT_OR_NULL = "text", "list of text", "object", "text or null"
_RECORD_FIELDS = {
    "run_id": _TEXT,
    "pipeline": _TEXT,
    "links": _TEXT,
    "layout": _TEXT,
    "stages": _LIST,
    "config": _TEXT,
    "config_sha256": _TEXT,
    "config_dir": _TEXT,
    "started": _TEXT,
    "status": _TEXT,
    "error": _TEXT,
    "layout_signed_by": _TEXT,
    "dependency_scan": _TEXT,
    "source_commit": _TEXT_OR_NULL,
    "release": _TEXT_OR_NULL,
    "reproduces": _TEXT,
    "reproduced": _TEXT,
    "code": _OBJECT,
    "lineage": _OBJECT,
    "candidate": _OBJECT,
    "reused": _OBJECT,  # stage -> the earlier run and link it was reused from
}
RECORD_REQUIRED = ("run_id", "links", "layout", "pipeline", "stages")


def _has_type(value: Any, expected: str) -> bool:
    if expected == _TEXT:
        return isinstance(value, str)
    if expected == _TEXT_OR_NULL:
        return value is None or isinstance(value, str)
    if expected == _LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict)


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """run.json of `run_dir`, read within pipeline.bounded's caps, its known fields type-checked."""
    path = run_dir / RUN_RECORD
    try:
        record = bounded.read_json(path, what="run record")
    except FileNotFoundError:
        raise InputError(
            f"{run_dir} is not a chainproof run (no {RUN_RECORD})",
            hint="pass runs/<run-id>, runs/latest or releases/<name>/<version>",
        ) from None
    if not isinstance(record, dict) or any(k not in record for k in RECORD_REQUIRED):
        raise InputError(
            f"{path} is not a chainproof run record (needs {', '.join(RECORD_REQUIRED)})",
            hint="it was edited or truncated; the links and artifacts are the source of truth",
        )
    for name, expected in _RECORD_FIELDS.items():
        if name in record and not _has_type(record[name], expected):
            raise InputError(
                f"{path}: field '{name}' is {_json_type(record[name])}, expected {expected}",
                hint="it was edited or truncated; the links and artifacts are the source of truth",
            )
    return record


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "a list"
    if isinstance(value, list):
        return "a list holding non-text"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "text", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def workspace_of_run(run_dir: Path) -> Workspace:
    """runs/<id> lives in <workspace>/runs/."""
    return Workspace(run_dir.resolve().parent.parent)
