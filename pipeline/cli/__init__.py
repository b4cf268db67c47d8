"""The `chainproof` command: parse, one library call, render. Errors are caught only here.

Exit codes: 0 ok, 1 verification failed, 2 bad input or config, 3 environment drift,
4 a stage failed, 5 could not scan (no usable vulnerability database),
6 lineage not logged (MLflow unreachable), 70 an internal error (a bug: please report it
with the traceback).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import click

from pipeline.errors import Error

EXIT_BUG = 70

workspace_option = click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Where runs/, attestations/ and releases/ live.",
)


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chainproof")
def cli() -> None:
    """Reproducible ML pipelines whose every stage leaves a signed in-toto link."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@workspace_option
def run(config: Path, workspace: Path) -> None:
    """Run every stage of CONFIG, sign each link, verify the chain, publish the release."""
    from pipeline.config import load_config
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    cfg = load_config(config)
    result = Runner(cfg, Workspace(workspace.resolve()), on_event=_echo).run()
    ws = workspace.resolve()
    rel = lambda p: str(p.relative_to(ws)) if p.is_relative_to(ws) else str(p)  # noqa: E731
    click.echo(f"run id:    {result.run_id}")
    click.echo(f"artifacts: {rel(result.run_dir)}")
    click.echo(f"links:     {rel(result.links_dir)}")
    click.echo(
        f"release:   {rel(result.release_dir) if result.release_dir else '(no deploy stage)'}"
    )
    click.echo(f"lineage:   {result.lineage}")
    click.echo("verified: ok")


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--owner-key",
    help="Trusted owner key: a sha256 fingerprint (keyid) or a path to owner.pub. "
    "Default: this workspace's attestations/keys/owner.pub.",
)
@workspace_option
def verify(target: Path, owner_key: str | None, workspace: Path) -> None:
    """Verify a run (runs/<id>, runs/latest) or a release bundle (releases/<name>/<version>)."""
    from pipeline.release.verify import verify_target

    report = verify_target(target, owner_key=owner_key, workspace=workspace.resolve())
    click.echo(f"verifying {report.target}")
    for check, detail in report.checks:
        click.echo(f"  ok  {check:<18} {detail}")
    click.echo("verified: ok")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@workspace_option
def layout(config: Path, output: Path | None, workspace: Path) -> None:
    """Compile CONFIG into an in-toto layout signed by the owner key."""
    from pipeline.config import load_config
    from pipeline.runner.run import ensure_keys, write_signed_layout
    from pipeline.workspace import Workspace

    cfg = load_config(config)
    ws = Workspace(workspace.resolve())
    owner, functionary = ensure_keys(ws)
    dest = output or ws.layouts / f"{cfg.name}.layout"
    write_signed_layout(cfg, owner, functionary, dest, ws.keys)
    click.echo(
        f"wrote {dest} ({len(cfg.stages)} steps, signed by owner {owner.public.keyid[:16]}…)"
    )


@cli.group()
def keys() -> None:
    """Signing keys."""


@keys.command("init")
@click.option("--force", is_flag=True, help="Replace existing dev keys (old links stop verifying).")
@workspace_option
def keys_init(force: bool, workspace: Path) -> None:
    """Create dev owner and functionary keys (ed25519, private halves 0600, gitignored)."""
    from pipeline.provenance.keys import init_dev_keys, load_public_key
    from pipeline.workspace import Workspace

    ws = Workspace(workspace.resolve())
    written = init_dev_keys(ws.keys, force=force)
    for role in ("owner", "functionary"):
        key = load_public_key(ws.keys / f"{role}.pub")
        state = "created" if role in written else "exists "
        click.echo(f"{state} {role:<12} {key.keyid}  {ws.keys / (role + '.pem')}")


@cli.group()
def env() -> None:
    """Locked environments."""


@env.command("check")
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("requirements/main.txt"),
    show_default=True,
)
@click.option(
    "--python",
    "python",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Check another environment's interpreter instead of this one.",
)
def env_check(lock: Path, python: Path | None) -> None:
    """Check this interpreter against LOCK: versions, extras, installed-file hashes."""
    from pipeline.envcheck import check_environment, parse_lock

    fp = check_environment(parse_lock(lock), python=python, progress=_echo)
    click.echo(f"environment matches {lock}")
    for key, value in fp.as_dict().items():
        click.echo(f"  {key:<22} {value}")


@cli.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The chain as JSON, for programs.")
def show(target: Path, as_json: bool) -> None:
    """Show the chain of a run (runs/<id>) or a release bundle (releases/<name>/<version>):
    stage, key, materials -> products, and the dependency scan. UNVERIFIED: see `verify`."""
    from pipeline.show import read_chain, render_json, render_tree

    view = read_chain(target)
    click.echo(render_json(view) if as_json else render_tree(view))


@cli.group()
def lineage() -> None:
    """MLflow lineage."""


@lineage.command("sync")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def lineage_sync(run_dir: Path) -> None:
    """Log RUN_DIR's lineage to the tracking URI of its recorded config (idempotent)."""
    from pipeline.lineage import sync_run_dir

    click.echo(sync_run_dir(run_dir))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def reproduce(run_dir: Path) -> None:
    """Re-run RUN_DIR's recorded pipeline into a new run and compare every product.

    Exit 0 only when every compared product is identical; the comparison is written as a
    signed in-toto Statement (test-result predicate) beside the new run's links.
    """
    from pipeline.compare.reproduce import reproduce as do_reproduce

    result = do_reproduce(run_dir, on_event=_echo)
    click.echo(f"reproduced {result.original} as {result.reproduction}")
    for st in result.stages:
        for note in st.notes():
            click.echo(f"  {note}")
        for f in st.files:
            click.echo(
                f"  {'identical' if f.identical else 'DIFFERS  '}  {f.name}"
                + ("" if f.identical else f"\n      {f.detail}")
            )
    click.echo(f"statement: {result.statement_path}")
    click.echo("reproduced: identical" if result.identical else "reproduced: DIFFERENT")
    if not result.identical:
        sys.exit(1)


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--owner-key",
    help="Trusted owner key fingerprint or owner.pub path "
    "(default: this workspace's attestations/keys/owner.pub).",
)
@click.option("--port", type=int, default=8080, show_default=True)
@workspace_option
def serve(bundle: Path, owner_key: str | None, port: int, workspace: Path) -> None:
    """Verify release BUNDLE, then serve its predictions over HTTP on 127.0.0.1."""
    from pipeline.release.serving import serve as do_serve

    key = owner_key or str(workspace.resolve() / "attestations" / "keys" / "owner.pub")
    do_serve(bundle.resolve(), owner_key=key, port=port, on_ready=_echo)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A candidate lock: every stage runs in an environment built from it.",
)
@click.option(
    "--against",
    type=click.Path(file_okay=False, path_type=Path),
    help="The production release (default: MLflow's production alias, else the newest).",
)
@click.option("--owner-key", help="Owner key trusted for the production release.")
@click.option("--deploy", is_flag=True, help="Deploy the candidate if (and only if) it passes.")
@workspace_option
def candidate(
    config: Path,
    lock: Path | None,
    against: Path | None,
    owner_key: str | None,
    deploy: bool,
    workspace: Path,
) -> None:
    """Run CONFIG as a candidate and gate it against production: exit 0 passed, 1 blocked."""
    from pipeline.compare.candidate import render, run_candidate
    from pipeline.workspace import Workspace

    result = run_candidate(
        config,
        Workspace(workspace.resolve()),
        lock=lock,
        against=against,
        owner_key=owner_key,
        deploy=deploy,
        on_event=_echo,
    )
    click.echo(render(result))
    if not result.passed:
        sys.exit(1)


@cli.group()
def scan() -> None:
    """Security scans: dependencies against an offline OSV database, model files."""


def _register_extensions() -> None:
    from pipeline.cli.compare import diff
    from pipeline.cli.deps import deps, scan_deps, vulndb
    from pipeline.cli.scan_model import scan_model

    cli.add_command(deps)
    cli.add_command(diff)
    cli.add_command(vulndb)
    scan.add_command(scan_deps, name="deps")
    scan.add_command(scan_model, name="model")


_register_extensions()


def _terminate(signum: int, _frame) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so runs record "failed", kill their stage and
    # remove staging directories instead of dying mid-step with "running" on disk.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # only serve imports TensorFlow here
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        cli.main(standalone_mode=False)
    except Error as e:
        click.echo(
            f"error: {e.diagnostics()}" if not hasattr(e, "check") else e.diagnostics(), err=True
        )
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception:  # a bug, not a user error: keep its traceback, give it its own code
        traceback.print_exc()
        click.echo(
            "chainproof: internal error (exit 70); please report the traceback above", err=True
        )
        sys.exit(EXIT_BUG)
    sys.exit(0)


if __name__ == "__main__":
    main()
