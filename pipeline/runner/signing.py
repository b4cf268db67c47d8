"""The runner's keys: dev keys on first use, the OpenSSF release key, the signed layout."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.codedigest import CodeManifest, code_manifest, pipeline_packages
from pipeline.config import PipelineConfig
from pipeline.errors import VerificationError
from pipeline.fsutil import atomic_write_bytes
from pipeline.hashing import sha256_file
from pipeline.provenance import keys as keymod
from pipeline.provenance.chain import VerifyReport, load_layout
from pipeline.provenance.layout import LayoutPins, compile_layout, signed_layout_bytes
from pipeline.runner.distributed import worker_counts


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
    """Owner and functionary signers; dev keys are created on first use (under a lock).

    This is the one-machine convenience path (both keys here). A runner under a layout the
    owner signed elsewhere uses `functionary_key` alone.
    """
    with _file_lock(keys_dir / ".lock"):
        if not any(os.environ.get(keymod.ENV_URI.format(role=r.upper())) for r in keymod.ROLES):
            keymod.init_dev_keys(keys_dir)
    return keymod.load_signer("owner", keys_dir), keymod.load_signer("functionary", keys_dir)


def functionary_key(keys_dir: Path) -> keymod.KeyPair:
    """The runner's own signer; a dev functionary key is created on first use, never an owner's."""
    with _file_lock(keys_dir / ".lock"):
        if not os.environ.get(keymod.ENV_URI.format(role="FUNCTIONARY")):
            keymod.init_dev_keys(keys_dir, roles=("functionary",))
    return keymod.load_signer("functionary", keys_dir)


def config_code(config: PipelineConfig) -> CodeManifest:
    """The manifest of the code that runs `config`: chainproof and every stage package."""
    return code_manifest(pipeline_packages(tuple(s.impl.module for s in config.stages)))


def layout_pins(
    config: PipelineConfig, code: CodeManifest, *, signed_by: str, run_id: str | None = None
) -> LayoutPins:
    locks = dict.fromkeys([config.lock, *(s.lock for s in config.stages if s.lock)])
    return LayoutPins(
        pipeline=config.name,
        config_sha256=config.sha256,
        locks={p.name: sha256_file(p) for p in locks if p is not None},
        code_sha256=code.sha256,
        code=dict(code.files),
        signed_by=signed_by,
        run_id=run_id,
        workers=worker_counts(config.stages),
    )


def release_key_paths(keys_dir: Path) -> tuple[Path, Path] | None:
    """(private, public) of the OpenSSF model-signing key, when there is one."""
    priv = Path(os.environ.get("CHAINPROOF_RELEASE_KEY", keys_dir / keymod.RELEASE_KEY))
    pub = Path(os.environ.get("CHAINPROOF_RELEASE_PUBKEY", keys_dir / keymod.RELEASE_PUB))
    return (priv, pub) if priv.is_file() and pub.is_file() else None


def write_signed_layout(
    config: PipelineConfig,
    owner: keymod.KeyPair,
    functionary: keymod.PublicKey,
    dest: Path,
    keys_dir: Path,
    *,
    pins: LayoutPins,
    extra_checks: tuple[str, ...] = (),
    release_pub: Path | None = None,
) -> None:
    """Compile `config` into a layout naming `functionary`, pinning `pins`, signed by `owner`.

    `release_pub` (default: the workspace's) is the OpenSSF release key the layout binds.
    """
    release = (None, release_pub) if release_pub else release_key_paths(keys_dir)
    layout = compile_layout(
        config,
        functionary=functionary,
        pins=pins,
        modules={s.kind: s.impl.module for s in config.stages},
        gates=frozenset(s.kind for s in config.stages if s.impl.gate),
        release_key=keymod.release_public_key(release[1].read_bytes()) if release else None,
        extra_checks=extra_checks,
    )
    atomic_write_bytes(dest, signed_layout_bytes(layout, owner.signer))


def accept_layout(
    path: Path,
    owner: keymod.PublicKey,
    config: PipelineConfig,
    code: CodeManifest,
    functionary: keymod.PublicKey,
) -> LayoutPins:
    """Check a layout the owner signed beforehand against what is about to run.

    Refuses (VerificationError, exit 1) when it is not signed by `owner`, has expired, does
    not name this runner's functionary key, or pins another config, lock or code.
    """
    report = VerifyReport(target=str(path), owner_keyid=owner.keyid)
    layout = load_layout(path, owner, report)
    pins = report.pins
    if pins is None:
        raise VerificationError(
            f"{path} pins no config, locks or code",
            check="layout pins",
            artifact=str(path),
            hint="the owner must sign a layout with `chainproof layout CONFIG -o FILE`",
        )
    if functionary.keyid not in {k for step in layout.steps for k in step.pubkeys}:
        raise VerificationError(
            f"the layout does not authorise this runner's functionary key {functionary.keyid}",
            check="layout pins",
            artifact=str(path),
            hint="give the owner this runner's functionary.pub and have the layout signed again",
        )
    want = layout_pins(config, code, signed_by="owner")
    problems = []
    if pins.config_sha256 != want.config_sha256:
        problems.append(
            f"config {config.path} has sha256 {want.config_sha256}, the layout pins "
            f"{pins.config_sha256}"
        )
    for name, digest in want.locks.items():
        if pins.locks.get(name) != digest:
            problems.append(
                f"lock {name} has sha256 {digest}, the layout pins {pins.locks.get(name)}"
            )
    if pins.code_sha256 != want.code_sha256:
        problems.append(
            f"the code has sha256 {want.code_sha256}, the layout pins {pins.code_sha256}:\n    "
            + "\n    ".join(code.diff(pins.code)[:40])
        )
    if problems:
        raise VerificationError(
            "refusing to run: this is not what the owner signed the layout for:\n  "
            + "\n  ".join(problems),
            check="layout pins",
            artifact=str(path),
            hint="run the reviewed config, locks and code, or have the owner sign a new layout",
        )
    return pins
