"""Benchmark the offline OSV store: import the PyPA snapshot, scan locks against it (JSON lines).

    .venv/bin/python bench/bench_vulndb.py [--snapshot DIR] [--pip-audit PATH/TO/pip-audit]

Figures: the import of the whole snapshot, a scan of the project's own lock (target < 1 s) and
of a lock of known-vulnerable old pins. With `--pip-audit`, the same locks are audited by
pip-audit (installed elsewhere: it is not a project dependency) against the same records,
served by a local OSV `/v1/query` endpoint on 127.0.0.1 that answers a bounded number of
requests and stops by itself; findings agreement and the time ratio are reported.

That endpoint matches by the records' enumerated `affected[].versions` lists only, the data's
own answer, independent of chainproof's range evaluation: differences are reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from pipeline.scan.deps import from_lock
from pipeline.scan.vulndb import VulnDB, import_osv
from pipeline.scan.vulns import scan

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SNAPSHOT = REPO.parent / "shared" / "osv" / "pypa-advisory-database"
OLD_PINS = """\
certifi==2018.4.16
    # via requests
chardet==3.0.4
    # via requests
idna==2.7
    # via requests
pyyaml==5.3
    # via -r old.in
requests==2.19.0
    # via -r old.in
urllib3==1.23
    # via requests
"""
# A 2019-era stack, no annotations (every pin is then a root): many advisories, several with
# multi-range and unsorted events, for a wider agreement check.
OLD_STACK = """\
django==2.0
flask==0.12
jinja2==2.10
werkzeug==0.14
pillow==6.0.0
numpy==1.16.0
tensorflow==1.15.0
cryptography==2.5
lxml==4.2.0
sqlalchemy==1.2.0
paramiko==2.4.0
pyjwt==1.5.0
markdown==2.6
bleach==2.1
httplib2==0.11.0
setuptools==40.0.0
pip==19.0
wheel==0.32.0
babel==2.6.0
mistune==0.8.3
"""


def emit(**fields: Any) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, list[float]]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, times


def bench_import(snapshot: Path, db: Path, repeat: int) -> None:
    info, times = timed(lambda: import_osv(snapshot / "vulns", db), repeat)
    emit(
        bench="vulndb_import",
        records=info.records,
        packages=info.packages,
        seconds_first=round(times[0], 3),
        seconds_min=round(min(times), 3),
        seconds_median=round(statistics.median(times), 3),
        db_bytes=db.stat().st_size,
    )


def our_scan(lock: Path, db: Path) -> set[tuple[str, str]]:
    """Everything a `scan deps` does but render: parse the lock, open the store, match."""
    result = scan(from_lock(lock), db)
    return {(f.package, f.id) for f in result.findings}


def bench_scan(label: str, lock: Path, db: Path, repeat: int) -> tuple[set, float]:
    found, times = timed(lambda: our_scan(lock, db), repeat)
    emit(
        bench="scan",
        lock=label,
        packages=len(from_lock(lock).packages),
        findings=len(found),
        seconds_first=round(times[0], 4),  # cold: what one CLI invocation pays
        seconds_min=round(min(times), 4),
        seconds_median=round(statistics.median(times), 4),
        target_seconds=1.0,
    )
    return found, times[0]


# --------------------------------------------------------------------------- pip-audit


def _affected_by_listed_versions(record: dict[str, Any], name: str, version: str) -> bool:
    try:
        wanted: Version | str = Version(version)
    except InvalidVersion:
        wanted = version
    for affected in record.get("affected") or []:
        pkg = affected.get("package") or {}
        if pkg.get("ecosystem") != "PyPI" or canonicalize_name(pkg.get("name", "")) != name:
            continue
        for listed in affected.get("versions") or []:
            try:
                if Version(listed) == wanted:
                    return True
            except InvalidVersion:
                if listed == version:
                    return True
    return False


@contextmanager
def osv_endpoint(db: Path, *, max_requests: int, lifetime: float) -> Iterator[str]:
    """A local OSV `/v1/query` endpoint over the store; bounded, and it stops by itself."""
    lock = threading.Lock()
    served = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            with lock:
                served[0] += 1
                over = served[0] > max_requests
            if over or self.path != "/v1/query":
                self.send_error(429 if over else 404)
                return
            query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = canonicalize_name(query["package"]["name"])
            version = query["version"]
            with VulnDB.open(db) as store:  # per request: sqlite handles are per thread
                records = store.records_for([name])[name]
            vulns = [r for r in records if _affected_by_listed_versions(r, name, version)]
            body = json.dumps({"vulns": vulns} if vulns else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = threading.Timer(lifetime, server.shutdown)  # stops even if we never return
    deadline.daemon = True
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1/query"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()


def pip_audit(binary: Path, lock: Path, url: str, workdir: Path) -> tuple[set, float]:
    out = workdir / f"pip-audit-{lock.stem}.json"
    cmd = [
        str(binary), "-r", str(lock), "--disable-pip", "--no-deps", "-s", "osv",
        "--osv-url", url, "-f", "json", "-o", str(out), "--progress-spinner", "off",
        "--cache-dir", str(workdir / "pip-audit-cache"), "--timeout", "30",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1 = vulnerabilities found
        raise RuntimeError(f"pip-audit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    found = {
        (canonicalize_name(d["name"]), v["id"])
        for d in doc.get("dependencies", [])
        for v in d.get("vulns", [])
    }
    return found, seconds


# `chainproof scan deps --format json` in a fresh interpreter, as pip-audit is timed: the
# command is not registered on the main CLI here, so its click command is called directly.
_CLI = """
import sys
from pipeline.cli.scan import scan_deps
from pipeline.errors import Error
try:
    scan_deps.main(["--lock", sys.argv[1], "--db", sys.argv[2], "--format", "json"],
                   standalone_mode=False)
except Error as e:
    sys.exit(e.exit_code)
"""


def our_cli(lock: Path, db: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, str(lock), str(db)], capture_output=True, timeout=120
    )
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"chainproof scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def bench_pip_audit(
    binary: Path, locks: dict[str, Path], ours: dict[str, tuple[set, float]], db: Path, tmp: Path
) -> None:
    for label, lock in locks.items():
        with osv_endpoint(db, max_requests=2000, lifetime=300) as url:
            theirs, seconds = pip_audit(binary, lock, url, tmp)
        mine, my_seconds = ours[label]
        cli_seconds = our_cli(lock, db)
        emit(
            bench="pip_audit_comparison",
            lock=label,
            pip_audit_seconds=round(seconds, 3),
            chainproof_seconds=round(my_seconds, 4),  # cold, in-process
            time_ratio=round(seconds / my_seconds, 1) if my_seconds else None,
            chainproof_cli_seconds=round(cli_seconds, 3),  # fresh interpreter, like pip-audit
            cli_time_ratio=round(seconds / cli_seconds, 2),
            chainproof_findings=len(mine),
            pip_audit_findings=len(theirs),
            agree=mine == theirs,
            only_chainproof=sorted(f"{p} {i}" for p, i in mine - theirs),
            only_pip_audit=sorted(f"{p} {i}" for p, i in theirs - mine),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=DEFAULT_SNAPSHOT)
    parser.add_argument("--pip-audit", type=Path, help="a pip-audit executable, to compare")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (args.snapshot / "vulns").is_dir():
        sys.exit(f"OSV snapshot {args.snapshot} absent (see ../shared/osv/README.md)")
    with tempfile.TemporaryDirectory(prefix="chainproof-bench-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "vulndb.sqlite"
        bench_import(args.snapshot, db, args.repeat)
        locks = {"requirements/main.txt": REPO / "requirements" / "main.txt"}
        for label, text in (("old-pins", OLD_PINS), ("old-stack", OLD_STACK)):
            locks[label] = tmp / f"{label}.txt"
            locks[label].write_text(text)
        ours = {label: bench_scan(label, lock, db, args.repeat) for label, lock in locks.items()}
        if args.pip_audit:
            bench_pip_audit(args.pip_audit, locks, ours, db, tmp)


if __name__ == "__main__":
    main()
