"""CLI for `chainproof diff A B`: what changed between two runs or release bundles.

A report, not a gate: exit 0 whenever the diff was computed, whatever it found; 2 on bad input
(a path that is neither a run nor a bundle, an unusable --db). Registered on the main group in
`pipeline/cli/__init__.py::_register_extensions()`.
"""

from __future__ import annotations

from pathlib import Path

import click

# The `--format` names, spelled out so that `--help` need not import the comparison; a unit
# test holds them equal to `pipeline.compare.render.FORMATS`, one implementation each.
FORMAT_NAMES = ("table", "json")


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMAT_NAMES),
    default="table",
    show_default=True,
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Rescan both sides' locks against this OSV store (e.g. .chainproof/vulndb.sqlite), "
    "so new and fixed vulnerabilities come from one database. Without it, each side's signed "
    "scan Statement (checks/dependencies.intoto.json) is compared, and a side that was never "
    "scanned is reported as such, never as clean.",
)
def diff(a: Path, b: Path, fmt: str, db: Path | None) -> None:
    """Compare A (baseline) with B: each a run (runs/<id>, runs/latest) or a release bundle.

    Dependencies, vulnerabilities, data, base model, config, environment, metrics and the
    model, read as recorded: run `chainproof verify` on each side to trust them.
    """
    from pipeline.compare.diff import diff as compare
    from pipeline.compare.recorded import load_lineage
    from pipeline.compare.render import render

    # Only an explicit --db rescans: a store that happens to sit in the cwd (or an env var
    # set for `scan deps`) must not silently replace what each side's gate signed.
    click.echo(render(compare(load_lineage(a), load_lineage(b), db=db), fmt))
