"""Options and helpers shared by the commands, declared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

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
