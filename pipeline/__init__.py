"""chainproof: reproducible ML pipelines whose every stage leaves a signed in-toto link.

Quick start::

    from pipeline import load_config, run, verify, load_verified, Error

    config = load_config("configs/digits-cnn.yaml")   # validated, frozen; ConfigError if not
    result = run(config)                              # every stage, signed, verified, released
    verify(result.release_dir, owner_key=FINGERPRINT) # offline, with only the bundle
    model = load_verified(result.release_dir, owner_key=FINGERPRINT)   # Keras, safe_mode

Every failure a user can act on is a `pipeline.Error` with `.diagnostics()` and `.exit_code`.
Names are imported lazily, so `import pipeline` costs nothing (stages import it too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Error", "load_config", "load_verified", "run", "verify"]

if TYPE_CHECKING:
    from pipeline.config import load_config
    from pipeline.errors import Error
    from pipeline.release.loading import load_verified


def run(config, *, workspace=".", on_event=None, sandbox=True, reuse=True):
    """Run a loaded config in `workspace`; returns the RunResult (see pipeline.runner.run).

    Stages run under bubblewrap; `sandbox=False` is the recorded `--no-sandbox`. A stage an
    earlier run of the workspace proves unchanged is reused; `reuse=False` is `--no-reuse`.
    """
    from pathlib import Path

    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    return Runner(
        config,
        Workspace(Path(workspace).resolve()),
        on_event=on_event or (lambda m: None),
        sandbox=sandbox,
        reuse=reuse,
    ).run()


def verify(target, *, owner_key=None, workspace=None):
    """Verify a run directory or release bundle; raises VerificationError, returns the report."""
    from pathlib import Path

    from pipeline.release.verify import verify_target

    return verify_target(
        Path(target), owner_key=owner_key, workspace=Path(workspace) if workspace else None
    )


def __getattr__(name: str) -> Any:
    if name == "Error":
        from pipeline.errors import Error

        return Error
    if name == "load_config":
        from pipeline.config import load_config

        return load_config
    if name == "load_verified":
        from pipeline.release.loading import load_verified

        return load_verified
    raise AttributeError(name)
