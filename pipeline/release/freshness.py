"""Freshness for consumers (TUF-style): refuse a release older than one already seen.

Per (owner key, release name), the newest release a consumer has verified is recorded in a
small state file (default ~/.chainproof/seen-releases.json, or $CHAINPROOF_STATE_DIR). A later
load of an older one — an attacker serving yesterday's vulnerable model — is a rollback and is
refused. Order is the release's signed publication time; versions are compared only against
an explicit minimum.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from pipeline.errors import VerificationError
from pipeline.fsutil import atomic_write_text
from pipeline.provenance.chain import VerifyReport

STATE_ENV = "CHAINPROOF_STATE_DIR"


def default_state() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".chainproof") / "seen-releases.json"


def _older(a: str, b: str) -> bool:
    """Is version `a` older than `b`? PEP 440 when both parse, else plain text order."""
    try:
        return Version(a) < Version(b)
    except InvalidVersion:
        return a < b


def check_fresh(
    report: VerifyReport, *, min_version: str | None = None, state: Path | None = None
) -> None:
    """Refuse a release below `min_version` or older than the newest one seen; record it."""
    release: dict[str, Any] = report.release or {}
    name, version = str(release.get("name")), str(release.get("version"))
    published = str(release.get("published", ""))
    if min_version is not None and _older(version, min_version):
        raise VerificationError(
            f"release {name} {version} is older than the minimum {min_version} you asked for",
            check="freshness",
            artifact=report.target,
        )
    path = state or default_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"{report.owner_keyid}/{name}"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            seen = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            seen = {}
        if not isinstance(seen, dict):
            seen = {}
        newest = seen.get(key) if isinstance(seen.get(key), dict) else None
        if newest and published < str(newest.get("published", "")):
            raise VerificationError(
                f"release {name} {version} (published {published}) is older than "
                f"{newest.get('version')} (published {newest.get('published')}), which this "
                "machine already verified: a rollback",
                check="freshness",
                artifact=report.target,
                hint=f"use the newer release, or reset the record in {path} if you mean it",
            )
        if not newest or published > str(newest.get("published", "")):
            seen[key] = {"version": version, "published": published}
            atomic_write_text(path, json.dumps(seen, indent=1, sort_keys=True) + "\n")
