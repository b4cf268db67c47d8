"""Options and helpers shared by the commands, declared once."""

from __future__ import annotations

from pathlib import Path

import click

workspace_option = click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Where runs/, attestations/ and releases/ live.",
)

owner_key_option = click.option(
    "--owner-key",
    help="Trusted owner key: a sha256 fingerprint (keyid) or a path to owner.pub. "
    "Default: this workspace's attestations/keys/owner.pub.",
)


def echo_progress(msg: str) -> None:
    """Progress and warnings go to stderr; results go to stdout."""
    click.echo(msg, err=True)
