"""The runner's keys: dev keys on first use, the OpenSSF release key, the signed layout."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.fsutil import atomic_write_bytes
from pipeline.provenance import keys as keymod
from pipeline.provenance.layout import compile_layout, signed_layout_bytes


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_keys(keys_dir: Path) -> tuple[keymod.KeyPair, keymod.KeyPair]:
    """Owner and functionary signers; dev keys are created on first use (under a lock)."""
    with _file_lock(keys_dir / ".lock"):
        if not any(os.environ.get(keymod.ENV_URI.format(role=r.upper())) for r in keymod.ROLES):
            keymod.init_dev_keys(keys_dir)
    return keymod.load_signer("owner", keys_dir), keymod.load_signer("functionary", keys_dir)


def release_key_paths(keys_dir: Path) -> tuple[Path, Path] | None:
    """(private, public) of the OpenSSF model-signing key, when there is one."""
    priv = Path(os.environ.get("CHAINPROOF_RELEASE_KEY", keys_dir / keymod.RELEASE_KEY))
    pub = Path(os.environ.get("CHAINPROOF_RELEASE_PUBKEY", keys_dir / keymod.RELEASE_PUB))
    return (priv, pub) if priv.is_file() and pub.is_file() else None


def write_signed_layout(
    config: PipelineConfig,
    owner: keymod.KeyPair,
    functionary: keymod.KeyPair,
    dest: Path,
    keys_dir: Path,
    extra_checks: tuple[str, ...] = (),
) -> None:
    release = release_key_paths(keys_dir)
    layout = compile_layout(
        config,
        functionary=functionary.public,
        modules={s.kind: s.impl.module for s in config.stages},
        gates=frozenset(s.kind for s in config.stages if s.impl.gate),
        release_key=keymod.release_public_key(release[1].read_bytes()) if release else None,
        extra_checks=extra_checks,
    )
    atomic_write_bytes(dest, signed_layout_bytes(layout, owner.signer))
