"""`chainproof data digest`: the pin of an image folder or archive (its manifest's sha256)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("data")
def data_group() -> None:
    """Datasets of files: pin an image folder or archive by one manifest digest."""


@data_group.command("digest")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--write-manifest",
    "write_manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the canonical manifest (the bytes the digest is of) to FILE; give it "
    "to the source stage as `manifest:` so a mismatch names the files.",
)
@click.option(
    "--against",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A manifest written earlier: list the files added, removed or changed since "
    "(exit 2 when any differ).",
)
@click.option("--json", "as_json", is_flag=True, help="Digest, file count and bytes as JSON.")
def digest(path: Path, write_manifest: Path | None, against: Path | None, as_json: bool) -> None:
    """Print the sha256 of PATH's canonical manifest: the `sha256:` of an image source.

    PATH is a folder (one sub-folder per class, or a labels file inside it), a .zip, .tar or
    .tar.gz of one. Every regular file counts; links, devices and unsafe archive members are
    refused.
    """
    from pipeline import datasets
    from pipeline.fsutil import atomic_write_bytes

    source, manifest = datasets.digest_path(path)
    if against is not None:
        earlier = datasets.read_manifest(against)
        datasets.check_pin(str(path), manifest, earlier.digest, earlier, pinned_by=f"{against} has")
    if write_manifest is not None:
        atomic_write_bytes(write_manifest, manifest.canonical_bytes())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(path),
                    "container": source.container,
                    "sha256": manifest.digest,
                    "files": len(manifest.files),
                    "bytes": manifest.total_bytes,
                    "format": datasets.FORMAT,
                    "manifest": str(write_manifest) if write_manifest else None,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return
    click.echo(f"sha256:{manifest.digest}  {len(manifest.files)} files  {path}")
    if write_manifest is not None:
        click.echo(f"manifest written to {write_manifest}", err=True)
