"""Commands a consumer runs on a run or a release: verify, show, serve."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.options import (
    echo_json,
    echo_progress,
    error_json,
    json_option,
    log_third_party,
    trust_options,
    workspace_option,
    workspace_trust,
)


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@trust_options
@click.option(
    "--release-version",
    help="The release version you expect (a bundle of any other version is refused).",
)
@workspace_option
@json_option
@click.pass_context
def verify(
    ctx: click.Context,
    target: Path,
    owner_key: str | None,
    owner_key_file: Path | None,
    release_version: str | None,
    workspace: Path,
    as_json: bool,
) -> None:
    """Verify a run (runs/<id>, runs/latest) or a release bundle (releases/<name>/<version>).

    Whom to trust is always explicit: --owner-key FINGERPRINT, --owner-key-file PATH, or (for
    your own runs) --workspace DIR to trust that workspace's owner key.
    """
    from pipeline.errors import Error
    from pipeline.release.verify import verify_target

    try:
        report = verify_target(
            target,
            owner_key=owner_key,
            owner_key_file=owner_key_file,
            workspace=workspace_trust(ctx, workspace),
            expected_version=release_version,
        )
    except Error as e:
        if as_json:  # the answer on stdout, the diagnostics on stderr, the exit code the same
            echo_json({"verified": False, "target": str(target), "error": error_json(e)})
        raise
    if as_json:
        echo_json(
            {
                "verified": True,
                "target": report.target,
                "owner_keyid": report.owner_keyid,
                "trust": report.trust,
                "run_id": report.run_id,
                "release": report.release,
                "checks": [{"check": c, "detail": d} for c, d in report.checks],
            }
        )
        return
    click.echo(f"verifying {report.target}")
    click.echo(f"  trusted owner key {report.owner_keyid} ({report.trust})")
    for check, detail in report.checks:
        click.echo(f"  ok  {check:<18} {detail}")
    click.echo("verified: ok")


@click.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The chain as JSON, for programs.")
def show(target: Path, as_json: bool) -> None:
    """Show the chain of a run (runs/<id>) or a release bundle (releases/<name>/<version>):
    stage, key, materials -> products, and the dependency scan. UNVERIFIED: see `verify`."""
    from pipeline.show import read_chain, render_json, render_tree

    view = read_chain(target)
    click.echo(render_json(view) if as_json else render_tree(view))


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@trust_options
@click.option("--port", type=int, default=8080, show_default=True)
@workspace_option
@click.pass_context
def serve(
    ctx: click.Context,
    bundle: Path,
    owner_key: str | None,
    owner_key_file: Path | None,
    port: int,
    workspace: Path,
) -> None:
    """Verify release BUNDLE, then serve its predictions over HTTP on 127.0.0.1."""
    from pipeline.release.serving import serve as do_serve

    trusted_ws = workspace_trust(ctx, workspace)
    if trusted_ws is not None:  # TensorFlow's and absl's warnings into that workspace's log
        log_third_party(trusted_ws)
    if not owner_key and not owner_key_file and trusted_ws is not None:
        owner_key_file = trusted_ws / "attestations" / "keys" / "owner.pub"
    do_serve(
        bundle.resolve(),
        owner_key=owner_key,
        owner_key_file=owner_key_file,
        port=port,
        on_ready=echo_progress,
    )


@click.group()
def release() -> None:
    """Published releases."""


@release.command("renew")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--days", type=int, required=True, help="How long from now it stays verifiable.")
@workspace_option
def release_renew(bundle: Path, days: int, workspace: Path) -> None:
    """The owner extends BUNDLE's lifetime; its layout and links stay untouched.

    Signed with the owner key (this workspace's, or $CHAINPROOF_OWNER_SIGNER).
    """
    from pipeline.provenance.keys import load_signer
    from pipeline.release.renew import renew
    from pipeline.workspace import Workspace

    owner = load_signer("owner", Workspace(workspace.resolve()).keys)
    until = renew(bundle, owner, days=days)
    click.echo(f"renewed {bundle} until {until:%Y-%m-%dT%H:%M:%SZ} (owner {owner.public.keyid})")
