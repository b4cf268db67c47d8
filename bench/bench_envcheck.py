"""The environment check, cold and warm, against the check it replaced and against the two-core
sha256 limit of this machine, side by side in one run.

Every figure is one fresh process (that is what each `chainproof` start pays), the page cache
warm (a cold check is one with no digest cache, not one waiting for the disk), rounds
alternating, best of ROUNDS:

- old:        the previous check (RECORD re-hashed, in-memory cache only), loaded from git at
              the commit before the sealed manifest, with that commit's hasher;
- cold:       check_tree with no stat cache and no tree stamp: every file of site-packages hashed;
- warm:       check_tree with the sealed stat cache but no tree stamp (every entry compared);
- stamped:    check_tree with the tree stamp a clean check leaves (what every later start pays);
- deferred:   check_tree(defer=True), what `run`'s bootstrap does, in-process from the import
              of envmanifest: the time until it returns (the rest walked; TensorFlow, MLflow,
              ... still walking in a child) and until settle() has the child's answer, beside
              the same stamped check in line (defer=False), timed the same way;
- start:      `.venv/bin/chainproof --version` (bootstrap check + CLI start), stamped;
- sha256sum:  `xargs -0 -P2 sha256sum` over the same files: the issue's two-core limit;
- hashlib:    two threads hashing in-memory buffers of the same total size: the CPU's limit.

Results: JSON lines, also written to bench/out/envcheck.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))

OLD_CHECK = """
import sys, types, subprocess
sys.path.insert(0, {root!r})
def load(name, path):
    src = subprocess.run(["git", "show", f"{base}:{{path}}"], cwd={root!r},
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(name); mod.__file__ = path; sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod
hashing = load("old_hashing", "pipeline/hashing.py")
envcheck = load("old_envcheck", "pipeline/envcheck.py")
envcheck.hash_many = hashing.hash_many
try:
    fp = envcheck.check_environment(envcheck.parse_lock(__import__("pathlib").Path({lock!r})))
    print(fp.files_verified)
except Exception as e:  # the old check flags the isolated bin/chainproof (pip's RECORD row)
    assert all("bin/chainproof" in line for line in e.diff), e.diff
    print("all files hashed; only bin/chainproof (the isolated start script) differs")
"""

NEW_CHECK = """
import sys
sys.path.insert(0, {root!r})
from pipeline import envmanifest
r = envmanifest.check_tree(envmanifest.venv_of(sys.executable))
assert not r.diff, r.diff[:5]
print(r.files, r.hashed, r.bytes_hashed)
"""


def baseline_commit() -> str:
    """The commit before the sealed manifest arrived (the check this one replaced)."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "pipeline/envmanifest.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return f"{added[-1]}^"


def timed(cmd: list[str], **kw: object) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)  # type: ignore[call-overload]
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout.strip()


def file_list() -> tuple[list[str], int]:
    sys.path.insert(0, str(ROOT))
    from pipeline import envmanifest

    tree = envmanifest.scan_site(envmanifest.site_packages(VENV))
    return [p for p, _, _ in tree.files.values()], sum(s for _, s, _ in tree.files.values())


def hashlib_limit(total: int) -> float:
    """Seconds for two threads to hash `total` bytes held in memory (1 MiB updates)."""
    import hashlib

    block = bytes(1 << 20)
    per = total // 2 // len(block) + 1

    def work() -> None:
        h = hashlib.sha256()
        for _ in range(per):
            h.update(block)

    threads = [threading.Thread(target=work) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


DEFERRED_CHECK = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from pipeline import envmanifest
r = envmanifest.check_tree(envmanifest.venv_of(sys.executable), defer={defer})
ready = time.perf_counter() - t0
assert (r.pending is not None) == {defer} and not r.diff
s = envmanifest.settle(r)
assert not s.diff and s.loaded is None, "answered by the stamp"
print(f"{{ready:.4f}} {{time.perf_counter() - t0:.4f}}")
"""


def main() -> int:
    from pipeline.envmanifest import CACHE_NAME, STAMP_NAME

    if not (VENV / ".chainproof-manifest.json").is_file():
        print(json.dumps({"bench": "envcheck", "skipped": "the .venv is not sealed: make setup"}))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    base = baseline_commit()
    files, total = file_list()
    listing = OUT / "envcheck-files.txt"
    listing.write_bytes(b"\0".join(f.encode() for f in files) + b"\0")
    old_code = OLD_CHECK.format(root=str(ROOT), base=base, lock=str(ROOT / "requirements/main.txt"))
    new_code = NEW_CHECK.format(root=str(ROOT))
    deferred_code = DEFERRED_CHECK.format(root=str(ROOT), defer=True)
    inline_code = DEFERRED_CHECK.format(root=str(ROOT), defer=False)
    cache = VENV / CACHE_NAME
    kept = VENV / (CACHE_NAME + ".bench")
    stamp = VENV / STAMP_NAME  # each clean check below writes it again
    subprocess.run(["xargs", "-0", "cat"], stdin=listing.open("rb"), stdout=subprocess.DEVNULL)
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "old",
            "cold",
            "warm",
            "stamped",
            "stamped_inprocess",
            "deferred_ready",
            "deferred_settled",
            "start",
            "sha256sum",
        )
    }
    details: dict[str, str] = {}
    for _ in range(ROUNDS):
        t, details["old"] = timed([str(PY), "-c", old_code])
        times["old"].append(t)
        shutil.copy2(cache, kept)
        cache.unlink()
        stamp.unlink(missing_ok=True)
        try:
            t, details["cold"] = timed([str(PY), "-I", "-S", "-c", new_code])
        finally:
            if not cache.exists():
                os.replace(kept, cache)
            kept.unlink(missing_ok=True)
        times["cold"].append(t)
        stamp.unlink(missing_ok=True)
        t, details["warm"] = timed([str(PY), "-I", "-S", "-c", new_code])
        times["warm"].append(t)
        t, details["stamped"] = timed([str(PY), "-I", "-S", "-c", new_code])
        times["stamped"].append(t)
        _, out = timed([str(PY), "-I", "-S", "-c", deferred_code])
        ready, settled = map(float, out.split())
        times["deferred_ready"].append(ready)
        times["deferred_settled"].append(settled)
        _, out = timed([str(PY), "-I", "-S", "-c", inline_code])
        times["stamped_inprocess"].append(float(out.split()[0]))
        t, _ = timed([str(VENV / "bin" / "chainproof"), "--version"])
        times["start"].append(t)
        with listing.open("rb") as fh:
            t, _ = timed(["xargs", "-0", "-P2", "-n", "256", "sha256sum"], stdin=fh)
        times["sha256sum"].append(t)
    best = {k: min(v) for k, v in times.items()}
    limit = hashlib_limit(total)
    row = {
        "bench": "envcheck",
        "files": len(files),
        "bytes": total,
        "rounds": ROUNDS,
        "baseline": base,
        "seconds": {k: round(v, 3) for k, v in best.items()}
        | {"hashlib_2threads": round(limit, 3)},
        "details": details,
        "ratios": {
            "cold / old": round(best["cold"] / best["old"], 2),
            "warm / old": round(best["warm"] / best["old"], 2),
            "stamped / warm": round(best["stamped"] / best["warm"], 2),
            "deferred ready / stamped in line, in-process (run's critical path)": round(
                best["deferred_ready"] / best["stamped_inprocess"], 2
            ),
            "start / old": round(best["start"] / best["old"], 2),
            "cold vs sha256sum -P2 (share of the limit, target >= 0.60)": round(
                best["sha256sum"] / best["cold"], 2
            ),
            "cold vs 2-thread hashlib in memory (share of the CPU limit)": round(
                limit / best["cold"], 2
            ),
            "old vs sha256sum -P2": round(best["sha256sum"] / best["old"], 2),
        },
    }
    print(json.dumps(row))
    (OUT / "envcheck.json").write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
