"""Benchmark dependency trust beyond CVEs (JSON lines): malicious packages, look-alikes, deps fix.

    .venv/bin/python bench/bench_deptrust.py [--pip-audit PATH/TO/pip-audit] [--repeat 3]

Figures, each beside its baseline from the same run:
- importing the PyPA snapshot and the OpenSSF malicious-packages sample together, against the
  PyPA snapshot alone;
- scanning the project's lock with both loaded and the look-alike check on (target < 0.5 s),
  against the PyPA-only scan without it;
- the look-alike check of 10,000 names (random, plus near misses of popular ones);
- `deps fix` on locks of known-vulnerable old pins: findings cleared and packages moved, and
  with `--pip-audit`, the same for `pip-audit --fix` (against the same records, served by
  bench_vulndb's local OSV endpoint; pip-audit is not a project dependency).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vulndb import OLD_PINS, OLD_STACK, emit, osv_endpoint, timed

from pipeline.scan import vulns
from pipeline.scan.depfix import apply_to_graph, plan_fix
from pipeline.scan.deps import from_lock
from pipeline.scan.lookalike import load_popular
from pipeline.scan.vulndb import VulnDB, import_osv
from pipeline.scan.vulns import scan

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "osv"
PYPA = SHARED / "pypa-advisory-database"
MALICIOUS = SHARED / "malicious-sample"


def median(times: list[float]) -> float:
    return round(statistics.median(times), 4)


def bench_import(tmp: Path, repeat: int) -> tuple[Path, Path]:
    both, pypa = tmp / "both.sqlite", tmp / "pypa.sqlite"
    info, t_both = timed(lambda: import_osv([PYPA, MALICIOUS], both), repeat)
    _, t_pypa = timed(lambda: import_osv(PYPA, pypa), repeat)
    _, t_mal = timed(lambda: import_osv(MALICIOUS, tmp / "mal.sqlite"), repeat)
    emit(
        bench="import_pypa_and_malicious",
        records=info.records,
        malicious_records=info.malicious,
        malicious_file_hashes=info.file_hashes,
        seconds_median=median(t_both),
        baseline_pypa_only_seconds=median(t_pypa),
        malicious_only_seconds=median(t_mal),
        ratio=round(statistics.median(t_both) / statistics.median(t_pypa), 2),
    )
    return both, pypa


def bench_scan(both: Path, pypa: Path, repeat: int) -> None:
    graph = from_lock(REPO / "requirements" / "main.txt")

    def cold_full() -> vulns.ScanResult:
        vulns._DEFAULT_POPULAR.clear()  # a CLI invocation loads the list once
        return scan(graph, both)

    result, t_full = timed(cold_full, repeat)
    _, t_base = timed(lambda: scan(graph, pypa, popular=False), repeat)
    emit(
        bench="scan_project_lock_both_databases",
        packages=len(graph.packages),
        findings=len(result.findings),
        lookalikes=len(result.lookalikes),
        seconds_median=median(t_full),
        baseline_pypa_only_no_lookalike_seconds=median(t_base),
        ratio=round(statistics.median(t_full) / statistics.median(t_base), 2),
        target_seconds=0.5,
    )


def bench_lookalike(repeat: int) -> None:
    start = time.perf_counter()
    popular = load_popular()
    load_seconds = time.perf_counter() - start
    rng = random.Random(7)
    names = {
        "".join(rng.choice(string.ascii_lowercase + "-") for _ in range(rng.randint(4, 16))): "1"
        for _ in range(9_000)
    }
    for name in popular.names[:1000]:  # near misses: one letter doubled at the end
        names[name + name[-1]] = "1"
    # Each repeat on a fresh copy, so every figure includes building the index once.
    hits, times = timed(lambda: load_popular().check(names), repeat)
    emit(
        bench="lookalike_check",
        names=len(names),
        reference_names=len(popular.names),
        flagged=len(hits),
        seconds_median=median(times),
        list_load_seconds=round(load_seconds, 4),
    )


def bench_fix(pypa: Path, tmp: Path, pip_audit: Path | None) -> None:
    for label, text in (("old-pins", OLD_PINS), ("old-stack", OLD_STACK)):
        lock = tmp / f"{label}.txt"
        lock.write_text(text)
        graph = from_lock(lock)
        with VulnDB.open(pypa) as db:
            before = scan(graph, db, popular=False)
            plan = plan_fix(before, db.records_for(before.vulnerable_packages))
            after = scan(apply_to_graph(graph, plan), db, popular=False)
        row = {
            "bench": "deps_fix",
            "lock": label,
            "findings_before": len(before.findings),
            "chainproof_findings_after": len(after.findings),
            "chainproof_packages_moved": plan.moved,
            "chainproof_no_fix": [c.package for c in plan.unfixable],
        }
        if pip_audit is not None:
            row.update(_pip_audit_fix(pip_audit, lock, pypa, tmp))
        emit(**row)


def _pip_audit_fix(binary: Path, lock: Path, db: Path, tmp: Path) -> dict[str, object]:
    fixed = tmp / f"pip-audit-fixed-{lock.name}"
    shutil.copy(lock, fixed)
    with osv_endpoint(db, max_requests=5000, lifetime=600) as url:
        cmd = [
            str(binary), "-r", str(fixed), "--disable-pip", "--no-deps", "-s", "osv",
            "--osv-url", url, "--fix", "--progress-spinner", "off",
            "--cache-dir", str(tmp / "pip-audit-cache"), "--timeout", "30",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        return {"pip_audit_error": proc.stderr[-500:]}
    old = {n: p.version for n, p in from_lock(lock).packages.items()}
    new_graph = from_lock(fixed)
    new = {n: p.version for n, p in new_graph.packages.items()}
    after = scan(new_graph, db, popular=False)
    return {
        "pip_audit_findings_after": len(after.findings),
        "pip_audit_packages_moved": sum(1 for n in old if new.get(n) != old[n]),
        "pip_audit_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip-audit", type=Path, help="a pip-audit executable, to compare")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (PYPA.is_dir() and MALICIOUS.is_dir()):
        sys.exit(f"the OSV samples in {SHARED} are absent (see ../shared/osv/README.md)")
    with tempfile.TemporaryDirectory(prefix="chainproof-bench-") as tmp_name:
        tmp = Path(tmp_name)
        both, pypa = bench_import(tmp, args.repeat)
        bench_scan(both, pypa, args.repeat)
        bench_lookalike(args.repeat)
        bench_fix(pypa, tmp, args.pip_audit)


if __name__ == "__main__":
    main()
