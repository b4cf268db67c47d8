"""CLI for the dependency supply chain: `deps graph|why`, `vulndb import|update|info`, `scan deps`.

Each command parses, makes one library call and renders; errors are `pipeline.errors.Error`
subclasses that the main CLI maps to exit codes (0 clean, 1 findings violate the policy,
2 bad input, 5 could not scan). Register on the main group in pipeline/cli.py:

    cli.add_command(deps)
    cli.add_command(vulndb)
    scan.add_command(scan_deps, name="deps")  # `scan`: the `chainproof scan` group
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pipeline.scan.deps import DepGraph
    from pipeline.scan.vulndb import DBInfo

DEFAULT_LOCK = Path("requirements/main.txt")
# The `scan deps --format` choices; tests check each maps to exactly one VulnerabilityFormat
# (importing the renderers here would slow every command's start-up).
SCAN_FORMATS = ("table", "json", "cyclonedx", "sarif")
DEFAULT_DB = Path(".chainproof/vulndb.sqlite")


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--lock FILE | --installed [--python PY]: where the dependency graph comes from."""
    f = click.option(
        "--python",
        "python",
        type=click.Path(dir_okay=False, path_type=Path),
        help="With --installed: read another environment, the one owning this interpreter.",
    )(f)
    f = click.option(
        "--installed",
        is_flag=True,
        help="Read the installed distributions (Requires-Dist) instead of a lock.",
    )(f)
    return click.option(
        "--lock",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"A pip-compile lock with '# via' annotations. [default: {DEFAULT_LOCK}]",
    )(f)


db_option = click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CHAINPROOF_VULNDB",
    default=DEFAULT_DB,
    show_default=True,
    help="The offline OSV database (env CHAINPROOF_VULNDB).",
)

max_age_option = click.option(
    "--max-age-days",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Warn when the newest advisory in the database is older than this.",
)


def _graph(lock: Path | None, installed: bool, python: Path | None) -> DepGraph:
    from pipeline.envcheck import site_packages_of
    from pipeline.scan.deps import from_installed, from_lock

    if installed and lock is not None:
        raise click.UsageError("use either --lock or --installed, not both")
    if python is not None and not installed:
        raise click.UsageError("--python goes with --installed")
    if installed:
        return from_installed(site_packages_of(python))
    return from_lock(lock or DEFAULT_LOCK)


# --------------------------------------------------------------------------- deps


@click.group()
def deps() -> None:
    """The dependency graph: what is pinned, and what pulls it in."""


@deps.command("graph")
@source_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tree", "json", "dot"]),
    default="tree",
    show_default=True,
)
def deps_graph(lock: Path | None, installed: bool, python: Path | None, fmt: str) -> None:
    """Show the whole transitive graph from the direct requirements down."""
    from pipeline.scan.deps import render_dot, render_json, render_tree

    graph = _graph(lock, installed, python)
    click.echo({"tree": render_tree, "json": render_json, "dot": render_dot}[fmt](graph))


@deps.command("why")
@click.argument("package")
@source_options
def deps_why(package: str, lock: Path | None, installed: bool, python: Path | None) -> None:
    """Every path from a direct requirement down to PACKAGE."""
    from pipeline.scan.deps import render_why

    click.echo(render_why(_graph(lock, installed, python), package))


# --------------------------------------------------------------------------- vulndb


@click.group()
def vulndb() -> None:
    """The offline OSV vulnerability database."""


def _echo_info(info: DBInfo, max_age_days: int) -> None:
    from pipeline.scan.vulndb import check_age

    for key, value in info.as_dict().items():
        click.echo(f"  {key:<16} {value}")
    stale = check_age(info, max_age=timedelta(days=max_age_days))
    if stale:
        _err(f"warning: {stale.message()}")


@vulndb.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@db_option
@max_age_option
def vulndb_import(path: Path, db: Path, max_age_days: int) -> None:
    """Import OSV records from PATH: a directory of JSON/YAML records or osv.dev's all.zip."""
    from pipeline.scan.vulndb import import_osv

    info = import_osv(path, db, progress=_err)
    click.echo(f"imported {info.records} records into {db}")
    _echo_info(info, max_age_days)


@vulndb.command("update")
@db_option
@click.option("--url", default=None, help="The export to fetch. [default: osv.dev PyPI all.zip]")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")
@max_age_option
def vulndb_update(db: Path, url: str | None, timeout: float, max_age_days: int) -> None:
    """Download osv.dev's PyPI export and import it (needs the network)."""
    from pipeline.scan.vulndb import OSV_PYPI_EXPORT, update

    info = update(db, url=url or OSV_PYPI_EXPORT, timeout=timeout, progress=_err)
    click.echo(f"updated {db}: {info.records} records")
    _echo_info(info, max_age_days)


@vulndb.command("info")
@db_option
@max_age_option
def vulndb_info(db: Path, max_age_days: int) -> None:
    """What the database holds, where it came from, and whether it is stale."""
    from pipeline.scan.vulndb import info

    _echo_info(info(db), max_age_days)


# --------------------------------------------------------------------------- scan deps


@click.command("deps")
@source_options
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(SCAN_FORMATS),
    default="table",
    show_default=True,
)
@click.option(
    "--severity",
    type=click.Choice(["low", "medium", "high", "critical"]),
    default=None,
    help="Fail on findings at or above this (default low, or the policy file's). "
    "Unknown severity fails at every threshold.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML policy: severity, and allow: [{id, reason, expires: YYYY-MM-DD}].",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
@max_age_option
def scan_deps(
    lock: Path | None,
    installed: bool,
    python: Path | None,
    db: Path,
    fmt: str,
    severity: str | None,
    policy_file: Path | None,
    output: Path | None,
    max_age_days: int,
) -> None:
    """Scan every pinned package, direct and transitive, against the offline OSV database."""
    from pipeline.fsutil import atomic_write_text
    from pipeline.scan.vulns import Policy, evaluate, load_policy, require_clean, scan
    from pipeline.scan.vulns_render import render

    graph = _graph(lock, installed, python)
    policy = load_policy(policy_file) if policy_file else Policy()
    if severity:
        policy = dataclasses.replace(policy, threshold=severity)
    result = scan(graph, db, max_age=timedelta(days=max_age_days))
    evaluation = evaluate(result, policy, date.today())
    text = render(result, fmt, evaluation)
    if output is not None:
        atomic_write_text(output, text + "\n")
        _err(f"wrote {output}")
    else:
        click.echo(text)
    if result.stale and (fmt != "table" or output is not None):
        _err(f"warning: {result.stale.message()}")
    for entry in evaluation.expired:
        _err(f"warning: allowlist entry {entry.id} expired on {entry.expires}; it allows nothing")
    require_clean(evaluation)
