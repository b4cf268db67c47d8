"""Options and helpers shared by the commands, declared once."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from pipeline.runner.progress import ProgressEvent

F = TypeVar("F", bound=Callable[..., Any])

workspace_option = click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Where runs/, attestations/ and releases/ live.",
)


def trust_options(func: F) -> F:
    """--owner-key FINGERPRINT and --owner-key-file PATH: the only ways to name whom to trust."""
    func = click.option(
        "--owner-key-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="The owner's public key file, obtained from the owner (checked against "
        "--owner-key too when both are given).",
    )(func)
    func = click.option(
        "--owner-key",
        metavar="FINGERPRINT",
        help="The owner's sha256 key fingerprint (64 hex), obtained from the owner through "
        "another channel than what you verify. Never a path.",
    )(func)
    return func


def workspace_trust(ctx: click.Context, workspace: Path) -> Path | None:
    """The workspace whose owner key may be trusted: only one given with --workspace."""
    if ctx.get_parameter_source("workspace") == ParameterSource.COMMANDLINE:
        return workspace.resolve()
    return None


def echo_progress(msg: str) -> None:
    """Progress and warnings go to stderr; results go to stdout."""
    click.echo(msg, err=True)


class RunProgress:
    """The terminal side of a run: messages as lines on stderr, epochs as a bar redrawn in
    place on a terminal, or one plain line per epoch when stderr is a file or a pipe."""

    BAR = 24

    def __init__(self, *, tty: bool | None = None) -> None:
        self.tty: bool = sys.stderr.isatty() if tty is None else tty
        self.open_bar = False  # a bar line without its newline yet

    def message(self, msg: str) -> None:
        self._close_bar()
        click.echo(msg, err=True)

    def epoch(self, event: ProgressEvent) -> None:
        if not self.tty:
            click.echo(event.describe(), err=True)
            return
        done = round(self.BAR * event.epoch / event.epochs)
        bar = "█" * done + "░" * (self.BAR - done)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in event.metrics.items())
        line = f"[{event.stage}] {bar} epoch {event.epoch}/{event.epochs}  {shown}".rstrip()
        click.echo(f"\r\x1b[K{line}", err=True, nl=False, color=True)
        self.open_bar = True
        if event.epoch == event.epochs:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.open_bar:
            click.echo("", err=True)
            self.open_bar = False


# Libraries whose chatter ("Creating initial MLflow database tables", alembic's migrations,
# absl and TensorFlow warnings) belongs in a log file, not between chainproof's own lines.
THIRD_PARTY_LOGGERS = ("mlflow", "alembic", "absl", "tensorflow", "h5py", "urllib3")


def log_third_party(workspace: Path) -> Path:
    """Send every Python log record to `<workspace>/.chainproof/logs/third-party.log`.

    MLflow attaches its own terminal handler when imported unless MLFLOW_CONFIGURE_LOGGING is
    false, so that is set here, before anything imports it; handlers a library already
    attached to the terminal are removed. chainproof itself reports through its callbacks,
    never through logging, so nothing of ours is lost from the terminal.
    """
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    path = workspace / ".chainproof" / "logs" / "third-party.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):  # one command, one log: a previous workspace's goes
        if getattr(h, "_chainproof", False) and h.baseFilename != str(path):  # type: ignore[attr-defined]
            root.removeHandler(h)
            h.close()
    if not any(getattr(h, "_chainproof", False) for h in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._chainproof = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:  # a terminal handler, not a file
                logger.removeHandler(h)
        logger.propagate = True
    return path


json_option = click.option(
    "--json", "as_json", is_flag=True, help="One JSON object on stdout (see the README's shapes)."
)


def echo_json(data: dict[str, Any]) -> None:
    """The one JSON object a --json command prints: sorted keys, so the shape diffs cleanly."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def error_json(e: Exception) -> dict[str, Any]:
    """A chainproof error as the `error` member of a --json answer (the exit code is the
    error's, unchanged; its diagnostics still go to stderr)."""
    out: dict[str, Any] = {
        "message": getattr(e, "message", str(e)),
        "hint": getattr(e, "hint", None),
        "exit_code": getattr(e, "exit_code", None),
    }
    for name in ("check", "step", "rule", "artifact"):
        if hasattr(e, name):
            out[name] = getattr(e, name)
    return out
