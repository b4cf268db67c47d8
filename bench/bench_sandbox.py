"""The stage sandbox's cost per stage: the same trivial stage command run through
runner/sandbox.py with and without bubblewrap, side by side, alternating rounds.

Two commands: `python -I -c pass` (the bare start-up, where the sandbox's share is largest)
and `python -I -c "import pipeline.stage"` (what every real stage imports first, pydantic
included); each with 20 material files bound, and the second also with 1,500 (a stage fed a
large directory of files, bound one by one). Plus the runner's material re-hash after a
stage, on 64 MiB of materials. Results: JSON lines, and bench/out/sandbox.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
ROUNDS = 15


def one(
    sb, box, root: Path, code: str, materials: tuple[Path, ...], i: int, packages: list[Path]
) -> float:
    workdir = root / f"stage{i}"
    workdir.mkdir()
    logs = sb.StageLogs(root / f"{i}.out", root / f"{i}.err")
    t0 = time.perf_counter()
    rc = sb.execute(
        [sys.executable, "-I", "-c", code],
        workdir=workdir,
        scratch=root / "tmp" / f"s{i}",
        logs=logs,
        timeout=120,
        sandbox=box,
        mounts=sb.Mounts(read_only=materials, anchor=root),
        packages=packages,
    )
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"the stage command failed under {box.tool}: {logs.tail()}")
    return elapsed


def compare(sb, bwrap, root: Path, label: str, code: str, n_materials: int) -> dict:
    mats = root / f"materials-{label}"
    mats.mkdir()
    materials = []
    for i in range(n_materials):
        p = mats / f"m{i:05d}.bin"
        p.write_bytes(i.to_bytes(8, "little") * 64)
        materials.append(p)
    packages = sb.package_dirs(["pipeline"])
    plain, boxed = [], []
    for i in range(ROUNDS):  # alternating, so drift on a shared machine hits both alike
        plain.append(one(sb, sb.NO_SANDBOX, root, code, tuple(materials), 2 * i, packages))
        boxed.append(one(sb, bwrap, root, code, tuple(materials), 2 * i + 1, packages))
        for d in root.glob("stage*"):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    p, b = statistics.median(plain), statistics.median(boxed)
    return {
        "bench": "sandbox",
        "command": label,
        "materials": n_materials,
        "rounds": ROUNDS,
        "no_sandbox_ms": round(p * 1000, 1),
        "bubblewrap_ms": round(b * 1000, 1),
        "sandbox_cost_ms_per_stage": round((b - p) * 1000, 1),
        "ratio": round(b / p, 3),
    }


def recheck(root: Path) -> dict:
    """The re-read of every material after a stage: what the post-stage check costs."""
    from pipeline.hashing import hash_artifacts

    mats = root / "recheck"
    mats.mkdir()
    named = {}
    for i in range(4):
        p = mats / f"m{i}.bin"
        p.write_bytes(bytes([i]) * (16 << 20))
        named[f"m{i}"] = p
    hash_artifacts(named)  # warm the page cache, as after the pre-stage hash
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        hash_artifacts(named)
        times.append(time.perf_counter() - t0)
    t = min(times)
    return {
        "bench": "sandbox",
        "command": "materials re-hash after a stage",
        "materials_mib": 64,
        "recheck_ms": round(t * 1000, 1),
        "mib_per_s": round(64 / t, 1),
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pipeline.runner import sandbox as sb

    try:
        bwrap = sb.find_bubblewrap()
    except sb.SandboxUnavailable as e:
        print(json.dumps({"bench": "sandbox", "skipped": e.message, "fix": e.hint}))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        root = Path(tmp)
        rows.append(compare(sb, bwrap, root, "python -I -c pass", "pass", 20))
        rows.append(compare(sb, bwrap, root, "import pipeline.stage", "import pipeline.stage", 20))
        rows.append(
            compare(
                sb, bwrap, root, "import pipeline.stage, 1500 files", "import pipeline.stage", 1500
            )
        )
        rows.append(recheck(root))
    for row in rows:
        print(json.dumps(row), flush=True)
    (OUT / "sandbox.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
