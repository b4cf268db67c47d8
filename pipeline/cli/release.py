"""Commands a consumer runs on a run or a release: verify, show, serve."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.options import echo_progress, owner_key_option, workspace_option


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@owner_key_option
@workspace_option
def verify(target: Path, owner_key: str | None, workspace: Path) -> None:
    """Verify a run (runs/<id>, runs/latest) or a release bundle (releases/<name>/<version>)."""
    from pipeline.release.verify import verify_target

    report = verify_target(target, owner_key=owner_key, workspace=workspace.resolve())
    click.echo(f"verifying {report.target}")
    for check, detail in report.checks:
        click.echo(f"  ok  {check:<18} {detail}")
    click.echo("verified: ok")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def show(run_dir: Path) -> None:
    """Show a run's chain as a tree: stage, key, materials -> products (UNVERIFIED)."""
    from pipeline.show import render_chain

    click.echo(render_chain(run_dir))


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@owner_key_option
@click.option("--port", type=int, default=8080, show_default=True)
@workspace_option
def serve(bundle: Path, owner_key: str | None, port: int, workspace: Path) -> None:
    """Verify release BUNDLE, then serve its predictions over HTTP on 127.0.0.1."""
    from pipeline.release.serving import serve as do_serve

    key = owner_key or str(workspace.resolve() / "attestations" / "keys" / "owner.pub")
    do_serve(bundle.resolve(), owner_key=key, port=port, on_ready=echo_progress)
