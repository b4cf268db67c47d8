"""CLI for the dependency supply chain: `deps graph|why|fix|vex|popular-refresh`,
`vulndb import|update|info`, `scan deps`.

Each command parses, makes one library call and renders; errors are `pipeline.errors.Error`
subclasses that the main CLI maps to exit codes (0 clean, 1 findings violate the policy,
2 bad input, 5 could not scan). Also `scan model`. pipeline/cli/__init__.py registers them:

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

from pipeline.cli.options import echo_json, json_option
from pipeline.scan.model import DEFAULT_FAIL_ON, DEFAULT_PROFILES, PROFILES, Severity

if TYPE_CHECKING:
    from pipeline.scan.deps import DepGraph
    from pipeline.scan.vulndb import DBInfo
    from pipeline.scan.vulns import Policy

SEVERITIES = [s.label for s in Severity]
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


def vex_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--vex FILE (repeatable) and the owner key that must have signed it."""
    f = click.option(
        "--owner-key",
        type=click.Path(dir_okay=False, path_type=Path),
        default=Path("attestations/keys/owner.pub"),
        show_default=True,
        help="The owner public key a VEX document must be signed with.",
    )(f)
    return click.option(
        "--vex",
        "vex_files",
        multiple=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="An owner-signed OpenVEX document (chainproof deps vex create). Repeatable.",
    )(f)


popular_option = click.option(
    "--popular",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The popular-projects list for look-alike names. [default: the shipped one]",
)

workspace_keys_option = click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("attestations/keys"),
    show_default=True,
    help="Where the owner key lives.",
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
@json_option
def deps_why(
    package: str, lock: Path | None, installed: bool, python: Path | None, as_json: bool
) -> None:
    """Every path from a direct requirement down to PACKAGE."""
    from pipeline.scan.deps import paths_to, render_why

    graph = _graph(lock, installed, python)
    if as_json:
        target = graph.resolve(package)
        paths = paths_to(graph, package)
        echo_json(
            {
                "package": target,
                "version": graph.version(target),
                "direct": target in graph.roots,
                "paths": [[{"name": n, "version": v} for n, v in p] for p in paths],
            }
        )
        return
    click.echo(render_why(graph, package))


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
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@db_option
@max_age_option
def vulndb_import(paths: tuple[Path, ...], db: Path, max_age_days: int) -> None:
    """Import OSV records from PATH...: directories of JSON/YAML records or osv.dev zips.

    Several sources go into one store, e.g. the PyPA advisory database and the OpenSSF
    Malicious Packages database (its MAL- records are matched by name and by file hash).
    """
    from pipeline.scan.vulndb import import_osv

    info = import_osv(list(paths), db, progress=_err)
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
    help="Fail on findings at or above this (default high, as the run's gate, or the "
    "policy file's). "
    "Unknown severity fails at every threshold.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML policy: severity, allow: [{id, reason, expires: YYYY-MM-DD}], "
    "accept_lookalikes: [{name, reason, expires}].",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
@vex_options
@popular_option
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
    vex_files: tuple[Path, ...],
    owner_key: Path,
    popular: Path | None,
    max_age_days: int,
) -> None:
    """Scan every pinned package, direct and transitive, against the offline OSV database.

    Known-malicious packages (OpenSSF MAL- records, also matched by file hash) and look-alike
    names of popular projects fail at any severity threshold.
    """
    from pipeline.fsutil import atomic_write_text
    from pipeline.scan.lookalike import load_popular
    from pipeline.scan.vulns import Policy, evaluate, load_policy, require_clean, scan
    from pipeline.scan.vulns_render import render

    graph = _graph(lock, installed, python)
    policy = load_policy(policy_file) if policy_file else Policy()
    if severity:
        policy = dataclasses.replace(policy, threshold=severity)
    policy = _with_vex(policy, vex_files, owner_key)
    reference = load_popular(popular) if popular else True
    result = scan(graph, db, max_age=timedelta(days=max_age_days), popular=reference)
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
    for s in evaluation.vex_expired:
        _err(f"warning: VEX statement for {s.vulnerability} expired on {s.expires}; it counts not")
    for r in policy.vex_rejected:
        _err(f"warning: VEX document {r.document} ignored: {r.reason}")
    require_clean(evaluation)


def _with_vex(policy: Policy, vex_files: tuple[Path, ...], owner_key: Path) -> Policy:
    """The policy with the VEX documents that verify against the owner key."""
    from pipeline.provenance.keys import load_public_key
    from pipeline.scan.vex import load_all

    if not vex_files:
        return policy
    statements, rejected = load_all(vex_files, [load_public_key(owner_key)])
    return dataclasses.replace(policy, vex=statements, vex_rejected=rejected)


# --------------------------------------------------------------------------- deps fix


@deps.command("fix")
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_LOCK,
    show_default=True,
    help="The pip-compile lock whose findings to clear.",
)
@click.option(
    "--in",
    "in_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .in file the lock was compiled from. [default: the lock's name with .in]",
)
@click.option("--write", is_flag=True, help="Apply the plan to the .in file (then: make upgrade).")
@db_option
def deps_fix(lock: Path, in_file: Path | None, write: bool, db: Path) -> None:
    """The smallest set of direct-requirement changes that clears the lock's findings.

    Exit 0 when the predicted result is clean, 1 when some finding has no fix.
    """
    from pipeline.scan.depfix import apply_to_graph, apply_to_in, plan_fix
    from pipeline.scan.deps import from_lock
    from pipeline.scan.vulndb import VulnDB
    from pipeline.scan.vulns import VulnerabilitiesFound, scan

    graph = from_lock(lock)
    with VulnDB.open(db) as store:
        result = scan(graph, store, popular=False)
        if not result.findings:
            click.echo(f"{lock}: no findings; nothing to fix")
            return
        plan = plan_fix(result, store.records_for(result.vulnerable_packages))
        after = scan(apply_to_graph(graph, plan), store, popular=False)
    for change in plan.changes:
        click.echo(change.describe())
    moved = plan.moved
    click.echo(
        f"{len(result.findings)} finding(s) in {len(result.vulnerable_packages)} package(s); "
        f"the plan moves {moved} package(s); predicted after it: {len(after.findings)} finding(s)"
    )
    target = in_file or lock.with_suffix(".in")
    if write and plan.fixable:
        apply_to_in(target, plan)
        _err(f"wrote {target}: now run `make upgrade` to compile and gate it")
    elif plan.fixable:
        _err(f"to apply: chainproof deps fix --lock {lock} --in {target} --write")
    if plan.unfixable or after.findings:
        raise VulnerabilitiesFound(
            f"{len(plan.unfixable)} package(s) have no fix: "
            + ", ".join(c.package for c in plan.unfixable),
            hint="remove or replace the requirement that pulls them in, or accept with a reason",
        )


# --------------------------------------------------------------------------- VEX


@deps.group("vex")
def vex() -> None:
    """Owner-signed OpenVEX "not affected" statements."""


@vex.command("create")
@click.option("--id", "vuln_id", required=True, help="The advisory id or alias (PYSEC-, CVE-).")
@click.option("--package", required=True, help="The package it is about (as locked).")
@click.option("--all-versions", is_flag=True, help="Cover every version, not only the locked one.")
@click.option(
    "--justification",
    type=click.Choice(
        [
            "component_not_present",
            "vulnerable_code_not_present",
            "vulnerable_code_not_in_execute_path",
            "vulnerable_code_cannot_be_controlled_by_adversary",
            "inline_mitigations_already_exist",
        ]
    ),
    required=True,
)
@click.option("--impact", required=True, help="Why it does not apply, in words.")
@click.option(
    "--expires",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    required=True,
    help="YYYY-MM-DD; after it the statement counts for nothing.",
)
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_LOCK,
    show_default=True,
    help="Where the package's version and file hashes (the statement's subjects) come from.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@workspace_keys_option
def vex_create(
    vuln_id: str,
    package: str,
    all_versions: bool,
    justification: str,
    impact: str,
    expires: Any,
    lock: Path,
    output: Path,
    keys_dir: Path,
) -> None:
    """Write an OpenVEX not_affected statement signed with the owner key."""
    from pipeline.provenance.keys import load_signer
    from pipeline.provenance.statements import write_signed_statement
    from pipeline.scan.deps import from_lock
    from pipeline.scan.vex import not_affected_statement

    graph = from_lock(lock)
    pkg = graph.packages[graph.resolve(package)]
    owner = load_signer("owner", keys_dir)
    stmt = not_affected_statement(
        vulnerability=vuln_id,
        package=pkg.name,
        version=None if all_versions else pkg.version,
        files={f"{pkg.name}=={pkg.version}#{i}": h for i, h in enumerate(pkg.hashes)},
        justification=justification,
        impact=impact,
        expires=expires.date(),
        author=f"owner key {owner.public.keyid}",
    )
    write_signed_statement(output, stmt, owner.signer)
    click.echo(f"wrote {output}: {vuln_id} not affected in {pkg.name} until {expires.date()}")


# --------------------------------------------------------------------------- popular names


@deps.command("popular-refresh")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=5000, show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the list. [default: the one chainproof ships]",
)
@click.option("--label", help="How to name the source in the list's header.")
def popular_refresh(source: Path, top: int, output: Path | None, label: str | None) -> None:
    """Rebuild the popular-projects list for look-alike checks from SOURCE.

    SOURCE: hugovk's top-pypi-packages JSON (e.g. top-pypi-packages-30-days.min.json), the
    same list as GuardDog ships it, or a text file with one name per line.
    """
    from pipeline.scan.lookalike import DATA_FILE, refresh_popular

    names = refresh_popular(source, output or DATA_FILE, top=top, label=label)
    click.echo(f"wrote {names.path}: {len(names.names)} names ({names.source}, {names.date})")


# `scan model` and `scan data` report the same two ways
table_or_json = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for CI and provenance.",
)


@click.command("model")
@click.argument("path", type=click.Path(path_type=Path))
@table_or_json
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES, case_sensitive=False),
    default=DEFAULT_FAIL_ON.label,
    show_default=True,
    help="Exit 1 when any finding is at or above this severity.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Choice(sorted(PROFILES), case_sensitive=False),
    help="Pickle allowlist profile (repeatable); replaces the default "
    f"({', '.join(DEFAULT_PROFILES)}). numpy is always on; add sklearn for scikit-learn models.",
)
def scan_model(path: Path, fmt: str, fail_on: str, profiles: tuple[str, ...]) -> None:
    """Scan PATH (a model file or directory) without loading it: pickles, PyTorch, joblib,
    .keras, .h5, SavedModel, .npy/.npz, safetensors, ONNX, GGUF, zip/tar. A file PATH names that
    is not a model is refused; inside a directory, non-model files are listed as not-a-model."""
    from pipeline.scan.model import UnsafeModelError, render_table, scan_path

    report = scan_path(path, profiles=profiles or None)
    click.echo(report.to_json() if fmt == "json" else render_table(report))
    if not report.ok(fail_on):
        raise UnsafeModelError(report, fail_on)


@click.command("data")
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@table_or_json
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A screen policy (YAML: detectors, fail_at, action, thresholds); default: built in.",
)
def scan_data(dataset: Path, fmt: str, policy_file: Path | None) -> None:
    """Screen DATASET (an .npz with x and y, or a run directory's canonical dataset) for
    label issues, backdoor triggers, duplicates and train/test leaks, class imbalance and
    outliers. Heuristic: exit 1 when findings reach the policy's threshold, 0 otherwise."""
    from pipeline.scan.data.dataset import load
    from pipeline.scan.data.interface import DataFindings
    from pipeline.scan.data.policy import ScreenPolicy, load_policy
    from pipeline.scan.data.screen import render_table, screen

    policy = load_policy(policy_file) if policy_file else ScreenPolicy()
    report = screen(load(dataset), policy)
    if fmt == "json":
        import json

        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(render_table(report))
    if report.verdict == "fail":
        failed = ", ".join(f"{k}: {n} >= {t}" for k, (n, t) in report.failed_kinds.items())
        raise DataFindings(
            f"data screen failed: {failed} row(s)",
            hint="inspect the rows named (index counts rows of the input as given), fix or "
            "remove them, or set the policy's fail_at",
        )
