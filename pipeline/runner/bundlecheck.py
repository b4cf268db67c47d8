"""The latest release's offline verification, started in a forked child as the `run` command
begins, before anything heavy is imported: the child imports model-signing (~0.9 s, for the
OpenSSF signature) and re-hashes the bundle on the other core while the runner does the rest
of the up-to-date check (runner/uptodate.py), which re-checks every fact the child reports.

This module imports nothing heavy: it runs before the config is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import forked
from pipeline.errors import InputError, VerificationError
from pipeline.workspace import RUN_ID, read_run_record

CHILD_ANSWER = 64 * 1024  # the child's answer is a few hundred bytes
CHILD_SECONDS = 600.0  # a big bundle takes as long to verify as `chainproof verify` does
MAX_CONFIG = 1 << 20  # a config file larger than this is not hashed here (load_config decides)
MAX_PIPELINES = 64  # release directories looked at for the one this config made
RELEASES = "releases"  # the default release.dir; another one only loses the early start


def newest_release(releases: Path) -> str | None:
    """The run id of the newest release directory, if `latest` names exactly it."""
    try:
        entries = list(os.scandir(releases))
        alias = os.readlink(releases / "latest")
    except OSError:
        return None
    ids = [e.name for e in entries if RUN_ID.match(e.name) and e.is_dir(follow_symlinks=False)]
    newest = max(ids, default=None)
    return newest if newest is not None and alias == newest else None


@dataclass
class BundleCheck:
    """A forked child verifying one bundle; `result()` is its answer (`verified_bundle`'s
    small dict, the owner keyid it trusted included) or None.

    Started only for a plausible answer (the newest release whose run.json names this config's
    digest: a hint, never trusted), and only from a single-threaded process."""

    run_id: str
    pid: int
    fd: int
    _done: bool = False

    @classmethod
    def start(cls, config: Path, workspace: Path) -> BundleCheck | None:
        if not forked.may_fork():
            return None
        found = _release_for(config, workspace)
        if found is None:
            return None
        bundle, run_id = found
        owner_file = workspace / "attestations" / "keys" / "owner.pub"

        def verify() -> bytes:  # in the child
            from pipeline.provenance.keys import load_public_key

            answer = verified_bundle(bundle, load_public_key(owner_file).keyid, run_id)
            return json.dumps(answer).encode()[:CHILD_ANSWER]

        child = forked.start(verify)
        return None if child is None else cls(run_id, *child)

    def result(self, timeout: float = CHILD_SECONDS) -> dict[str, Any] | None:
        """The child's answer, waited for at most `timeout`; then the child is gone."""
        try:
            data = forked.read_answer(self.fd, CHILD_ANSWER, timeout)
        finally:
            self.cancel()
        if not data:  # none, too late, or not what the child writes (over CHILD_ANSWER)
            return None
        try:
            answer = json.loads(data)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def cancel(self) -> None:
        """Stop and reap the child (idempotent)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self.fd)
        forked.reap(self.pid, kill=True)


def verified_bundle(bundle: Path, owner_key: str, version: str) -> dict[str, Any] | None:
    """What the up-to-date check needs of a bundle that verifies offline under `owner_key`
    (every check `chainproof verify` makes of it, the OpenSSF signature included), or None."""
    from pipeline.release.verify import verify_bundle

    try:
        report = verify_bundle(bundle, owner_key=owner_key, expected_version=version)
    except (VerificationError, InputError, OSError):
        return None
    layout = report.layout
    if layout is None:
        return None
    functionaries = {k for step in layout.steps for k in step.pubkeys}
    return {
        "run_id": report.run_id,
        "owner": owner_key,
        "release_keys": sorted(set(layout.keys) - functionaries),
        "expires": str(layout.expires),
    }


def _release_for(config: Path, workspace: Path) -> tuple[Path, str] | None:
    """(bundle, run id) of the one pipeline whose newest release's run.json records this
    config's digest (the config is not parsed yet; load_config will refuse a bad one)."""
    try:
        with open(config, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
        entries = list(os.scandir(workspace / RELEASES))[:MAX_PIPELINES]
    except OSError:
        return None
    if len(raw) > MAX_CONFIG:
        return None
    digest = hashlib.sha256(raw).hexdigest()
    found = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        run_id = newest_release(Path(entry.path))
        if run_id is None:
            continue
        try:
            hint = read_run_record(workspace / "runs" / run_id)
        except Exception:  # a hint only: any unreadable record means no early start
            continue
        if hint.get("config_sha256") == digest and hint.get("status") == "succeeded":
            found.append((Path(entry.path) / run_id, run_id))
    return found[0] if len(found) == 1 else None
