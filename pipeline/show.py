"""`chainproof show`: a run's chain as a tree, for people (not a verification)."""

from __future__ import annotations

from pathlib import Path

from pipeline.provenance.links import read_link
from pipeline.workspace import read_run_record


def render_chain(run_dir: Path) -> str:
    run_dir = run_dir.resolve()
    record = read_run_record(run_dir)
    links_dir = (run_dir / record["links"]).resolve()
    lines = [
        f"run {record['run_id']}  pipeline {record['pipeline']}  status {record.get('status')}",
        f"links {links_dir}  (unverified view: use `chainproof verify` to check)",
    ]
    for stage in record["stages"]:
        found = sorted(links_dir.glob(f"{stage}.*.link"))
        if not found:
            lines.append(f"└─ {stage}: no link (did not complete)")
            continue
        link = read_link(found[0])
        keyid = found[0].name.split(".")[-2]
        lines.append(f"└─ {stage}  key {keyid}  return {link.byproducts.get('return-value')}")
        for name, d in link.materials.items():
            lines.append(f"   ├─ in   {d['sha256'][:16]}  {name}")
        for name, d in link.products.items():
            lines.append(f"   ├─ out  {d['sha256'][:16]}  {name}")
    return "\n".join(lines)
