"""Commands that build: run, layout, keys, env check, lineage sync, reproduce, candidate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.options import (
    RunProgress,
    echo_json,
    echo_progress,
    json_option,
    log_third_party,
    trust_options,
    workspace_option,
)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--layout",
    "layout_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Run under this layout, signed beforehand by the owner (`chainproof layout`); only "
    "the functionary key is needed here. Needs --owner-key or --owner-key-file.",
)
@trust_options
@workspace_option
@click.option(
    "--no-sandbox",
    is_flag=True,
    help="Run stages without bubblewrap (where it cannot be installed); recorded in run.json "
    "and in every link as sandbox: none.",
)
@click.option(
    "--no-reuse",
    is_flag=True,
    help="Run every stage, even one an earlier run of this workspace proves unchanged "
    "(by default such a stage is reused; see `chainproof status`).",
)
@click.option(
    "--new-run",
    is_flag=True,
    help="Record a new run even when the latest release is up to date (stages are still "
    "reused where they verify; deploy runs and publishes a new release).",
)
@click.option(
    "--wait-lineage",
    is_flag=True,
    help="Log the MLflow lineage before returning (default: a detached process logs it after "
    "publish and records the outcome in run.json; its output is in logs/lineage.log).",
)
def run(
    config: Path,
    layout_file: Path | None,
    owner_key: str | None,
    owner_key_file: Path | None,
    workspace: Path,
    no_sandbox: bool,
    no_reuse: bool,
    new_run: bool,
    wait_lineage: bool,
) -> None:
    """Run every stage of CONFIG, sign each link, verify the chain, publish the release.

    A stage an earlier run of this workspace proves unchanged (its signed link, spec,
    materials, lock and code; its products re-hashed) is reused, unless --no-reuse. MLflow
    lineage is logged by a detached process once the run is done (`run` prints where it will
    appear and returns); --wait-lineage logs it before returning instead.

    When the run behind the latest release would be reproduced stage for stage and that
    release still verifies, nothing runs: `run` says it is up to date (exit 0) and names it."""
    from pipeline.runner.bundlecheck import BundleCheck

    # the latest release's offline check starts first, on the other core (a plausible one)
    early = None
    if not (no_reuse or new_run or layout_file):
        early = BundleCheck.start(config, workspace.resolve())
    from pipeline.config import load_config
    from pipeline.errors import InputError
    from pipeline.provenance.keys import resolve_trusted_owner
    from pipeline.runner.progress import held_out_metrics
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    try:
        cfg = load_config(config)
        ws = Workspace(workspace.resolve())
        log_third_party(ws.root)
        owner = None
        if layout_file is not None:
            if not owner_key and not owner_key_file:
                raise InputError(
                    "--layout needs the owner key that signed it",
                    hint="pass --owner-key FINGERPRINT or --owner-key-file PATH",
                )
            shipped = ws.keys / "owner.pub"
            owner = resolve_trusted_owner(
                owner_key, key_file=owner_key_file, shipped=shipped if shipped.is_file() else None
            )
        elif owner_key or owner_key_file:
            raise InputError("--owner-key and --owner-key-file go with --layout")
        terminal = RunProgress()
        result = Runner(
            cfg,
            ws,
            on_event=terminal.message,
            layout=layout_file,
            owner=owner,
            sandbox=not no_sandbox,
            reuse=not no_reuse,
            on_progress=terminal.epoch,
            detach_lineage=not wait_lineage,
        ).run(new_run=new_run, bundle_check=early)
    finally:
        if early is not None:  # its child never outlives the command
            early.cancel()
    root = ws.root
    rel = lambda p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p)  # noqa: E731
    click.echo(f"run id:    {result.run_id}")
    click.echo(f"artifacts: {rel(result.run_dir)}")
    click.echo(f"links:     {rel(result.links_dir)}")
    click.echo(
        f"release:   {rel(result.release_dir) if result.release_dir else '(no deploy stage)'}"
    )
    click.echo(f"lineage:   {result.lineage}")
    if result.up_to_date:
        click.echo(
            f"up to date: nothing ran; {', '.join(result.reused)} re-verified in run "
            f"{result.run_id} (--new-run records a new run, --no-reuse reruns every stage)"
        )
    elif result.reused:
        click.echo(f"reused:    {', '.join(result.reused)} (from earlier runs, re-verified)")
    held_out = held_out_metrics(result.run_dir, [s.name for s in cfg.stages])
    if held_out is not None:
        where, test = held_out
        samples = f", {test['samples']} samples" if isinstance(test.get("samples"), int) else ""
        click.echo(
            f"accuracy:  {test['accuracy']:.4f} on the held-out test split{samples} ({where})"
        )
    click.echo("verified: ok")


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--no-sandbox",
    is_flag=True,
    help="Answer for a run with --no-sandbox (earlier links record the sandbox they ran under).",
)
def status(config: Path, workspace: Path, as_json: bool, no_sandbox: bool) -> None:
    """Per stage of CONFIG: would the next run reuse it (from which run and link), or why not.

    Reasons name what changed: spec/params, a material digest, the lock, the code, a product
    tampered with after it was signed, an invalid signature. Nothing is written."""
    import json

    from pipeline.config import load_config
    from pipeline.runner.status import render, stage_status
    from pipeline.workspace import Workspace

    report = stage_status(
        load_config(config), Workspace(workspace.resolve()), sandbox=not no_sandbox
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for line in render(report):
            click.echo(line)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--functionary-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The runner's functionary.pub the layout authorises (default: this workspace's).",
)
@click.option(
    "--release-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The runner's OpenSSF release-ec.pub.pem the layout binds (default: this workspace's).",
)
@workspace_option
def layout(
    config: Path,
    output: Path | None,
    functionary_key: Path | None,
    release_key: Path | None,
    workspace: Path,
) -> None:
    """The owner's act: compile CONFIG into a layout pinning its config, locks and code.

    Signed with the owner key (this workspace's dev key, or $CHAINPROOF_OWNER_SIGNER). A
    runner then runs `chainproof run CONFIG --layout FILE --owner-key FINGERPRINT` holding only
    its functionary key, and refuses before any stage when anything pinned differs.
    """
    from pipeline.config import load_config
    from pipeline.provenance import keys as keymod
    from pipeline.runner.signing import config_code, layout_pins, write_signed_layout
    from pipeline.workspace import Workspace

    cfg = load_config(config)
    ws = Workspace(workspace.resolve())
    if not keymod.owner_signer_configured(ws.keys):
        keymod.init_dev_keys(ws.keys, roles=("owner",))
    owner = keymod.load_signer("owner", ws.keys)
    functionary = keymod.load_public_key(functionary_key or ws.keys / "functionary.pub")
    dest = output or ws.layouts / f"{cfg.name}.layout"
    write_signed_layout(
        cfg,
        owner,
        functionary,
        dest,
        ws.keys,
        pins=layout_pins(cfg, config_code(cfg), signed_by="owner"),
        release_pub=release_key,
    )
    click.echo(
        f"wrote {dest} ({len(cfg.stages)} steps, signed by owner {owner.public.keyid[:16]}…, "
        f"authorising functionary {functionary.keyid[:16]}…)"
    )


@click.group()
def keys() -> None:
    """Signing keys."""


@keys.command("init")
@click.option("--force", is_flag=True, help="Replace existing dev keys (old links stop verifying).")
@click.option(
    "--role",
    type=click.Choice(["owner", "functionary", "both"]),
    default="both",
    show_default=True,
    help="functionary: a runner's key (and its OpenSSF release key), never the owner's; "
    "owner: the layout signer, kept off the build machine.",
)
@workspace_option
def keys_init(force: bool, role: str, workspace: Path) -> None:
    """Create dev keys (ed25519, private halves 0600, gitignored)."""
    from pipeline.provenance.keys import ROLES, init_dev_keys, load_public_key
    from pipeline.workspace import Workspace

    ws = Workspace(workspace.resolve())
    roles = ROLES if role == "both" else (role,)
    written = init_dev_keys(ws.keys, force=force, roles=roles)
    for name in roles:
        key = load_public_key(ws.keys / f"{name}.pub")
        state = "created" if name in written else "exists "
        click.echo(f"{state} {name:<12} {key.keyid}  {ws.keys / (name + '.pem')}")


@keys.command("export")
@click.argument("name", type=click.Choice(["owner", "functionary"]))
@click.option(
    "--pem",
    is_flag=True,
    help="(required) SubjectPublicKeyInfo PEM, as in-toto-verify 3.x reads it.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE instead of stdout.",
)
@workspace_option
def keys_export(name: str, pem: bool, output: Path | None, workspace: Path) -> None:
    """The public half of key NAME, as PEM (never the private key)."""
    from pipeline.fsutil import atomic_write_bytes
    from pipeline.provenance.keys import load_public_key, public_key_path
    from pipeline.workspace import Workspace

    if not pem:  # the .pub files are already the securesystemslib JSON form
        raise click.UsageError("name the format: --pem (the only export format)")
    key = load_public_key(public_key_path(name, Workspace(workspace.resolve()).keys))
    data = key.to_pem()
    if output is None:
        click.echo(data.decode(), nl=False)
    else:
        atomic_write_bytes(output, data)
        echo_progress(f"wrote {output} ({name} key {key.keyid})")


@click.group()
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
@json_option
def env_check(lock: Path, python: Path | None, as_json: bool) -> None:
    """Check an environment against LOCK and every installed file against its sealed manifest."""
    from pipeline.envcheck import check_environment, parse_lock

    fp = check_environment(parse_lock(lock), python=python, progress=echo_progress)
    if as_json:  # drift is exit 3 with its diff on stderr, as without --json
        echo_json({"matches": True, "lock": str(lock), "fingerprint": fp.as_dict()})
        return
    click.echo(f"environment matches {lock}")
    for key, value in fp.as_dict().items():
        click.echo(f"  {key:<22} {value}")


@env.command("seal")
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("requirements/main.txt"),
    show_default=True,
    help="The lock the environment was just built from.",
)
@click.option("--force", is_flag=True, help="Re-seal an environment that is already sealed.")
@click.option("--no-compile", is_flag=True, help="Keep the existing .pyc files as they are.")
def env_seal(lock: Path, force: bool, no_compile: bool) -> None:
    """Byte-compile this environment's site-packages and seal a manifest of every file.

    The last step of building an environment from its lock (`make setup` runs it): the
    environment check compares against this manifest from then on. Started as
    `.venv/bin/chainproof env seal`, it runs in the stdlib-only bootstrap, before anything
    from site-packages is imported.
    """
    from pipeline import envmanifest

    venv = envmanifest.venv_of(sys.executable)
    dest = envmanifest.seal(venv, lock, force=force, compile_pyc=not no_compile)
    envmanifest.install_wrapper(venv)
    click.echo(f"sealed {dest} (lock {lock}; key {envmanifest.seal_key_path()})")


@click.group()
def lineage() -> None:
    """MLflow lineage."""


@lineage.command("sync")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def lineage_sync(run_dir: Path) -> None:
    """Log RUN_DIR's lineage to the tracking URI of its recorded config (idempotent)."""
    from pipeline.lineage import sync_run_dir
    from pipeline.release.verify import verified_release
    from pipeline.workspace import workspace_of_run

    # the alias moves only for a run that verifies now, under this store's workspace owner
    ws = workspace_of_run(run_dir).root
    log_third_party(ws)
    click.echo(sync_run_dir(run_dir, verified=lambda rd: verified_release(rd, ws)))


@lineage.command("detached", hidden=True)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@workspace_option
@click.option("--published", is_flag=True)
def lineage_detached(run_dir: Path, workspace: Path, published: bool) -> None:
    """What `run` starts after publish: log RUN_DIR, record the outcome in its run.json.

    --published carries the runner's own answer (it verified the chain and published the
    release), exactly what an inline log would have been told; not for interactive use."""
    from pipeline.runner.detached import log_detached

    click.echo(log_detached(run_dir, workspace.resolve(), published=published))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@trust_options
@json_option
def reproduce(
    run_dir: Path, owner_key: str | None, owner_key_file: Path | None, as_json: bool
) -> None:
    """Re-run RUN_DIR's recorded pipeline into a new run and compare every product.

    Exit 0 only when every compared product is identical; the comparison is written as a
    signed in-toto Statement (test-result predicate) beside the new run's links.
    """
    from pipeline.compare.reproduce import reproduce as do_reproduce
    from pipeline.workspace import RUN_RECORD, workspace_of_run

    if (run_dir / RUN_RECORD).is_file():
        log_third_party(workspace_of_run(run_dir).root)
    # the original verifies against the owner you name, else its own workspace's owner key
    terminal = RunProgress()
    result = do_reproduce(
        run_dir,
        on_event=terminal.message,
        owner_key=owner_key,
        owner_key_file=owner_key_file,
        on_progress=terminal.epoch,
    )
    if as_json:
        echo_json(
            {
                "original": result.original,
                "reproduction": result.reproduction,
                "identical": result.identical,
                "statement": str(result.statement_path),
                "stages": [
                    {
                        "stage": st.stage,
                        "identical": st.identical,
                        "skipped": st.skipped or None,
                        "notes": st.notes(),
                        "files": [
                            {"name": f.name, "identical": f.identical, "detail": f.detail}
                            for f in st.files
                        ],
                    }
                    for st in result.stages
                ],
            }
        )
        if not result.identical:
            sys.exit(1)
        return
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


@click.command()
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
@trust_options
@click.option("--deploy", is_flag=True, help="Deploy the candidate if (and only if) it passes.")
@workspace_option
def candidate(
    config: Path,
    lock: Path | None,
    against: Path | None,
    owner_key: str | None,
    owner_key_file: Path | None,
    deploy: bool,
    workspace: Path,
) -> None:
    """Run CONFIG as a candidate and gate it against production: exit 0 passed, 1 blocked."""
    from pipeline.compare.candidate import render, run_candidate
    from pipeline.workspace import Workspace

    log_third_party(workspace.resolve())
    terminal = RunProgress()
    result = run_candidate(
        config,
        Workspace(workspace.resolve()),
        lock=lock,
        against=against,
        owner_key=owner_key,
        owner_key_file=owner_key_file,
        deploy=deploy,
        on_event=terminal.message,
        on_progress=terminal.epoch,
    )
    click.echo(render(result))
    if not result.passed:
        sys.exit(1)
