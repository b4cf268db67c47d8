"""No-op `make train` (every unchanged stage reused) against DVC's no-op `dvc repro`.

    .venv/bin/python bench/bench_reuse.py [--repeats 3] [--dvc-venv /tmp/cmp-dvc]

1. One cold `chainproof run configs/digits-cnn.yaml --workspace <tmp>` (what `make train`
   runs) makes the earlier run; then each timed round is `make train` itself, whole
   (`RUN_ARGS="--workspace <tmp>"`): the run
   behind the latest release would be reproduced stage for stage (source, train and package
   reusable: links re-verified, products re-hashed) and that release verifies offline, so it
   is "up to date" and makes no run (runner/uptodate.py). Reported beside it: the same with
   `--new-run`, a new run in which those stages are reused (fresh links signed) and deploy,
   verify and publish run as usual. Target: <= 3 s wall.
2. DVC on the same pipeline shape: four stages with the same outputs (the cold run's own
   product files) and the same dependencies (each stage's upstream outputs, the lock, the
   stage's code, train's params), `dvc repro` once to fill dvc.lock, then timed no-op
   `dvc repro` rounds, alternating with chainproof's. DVC comes from PyPI into a throwaway
   venv (--dvc-venv, created when missing); when it cannot be installed, that side is
   skipped with the reason printed. Note what each side checks: DVC trusts its state cache
   (inode, mtime, size) and signs nothing; chainproof re-hashes every reused product and
   verifies every earlier link's signature.

Results: JSON lines on stdout and bench/out/reuse.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
CONFIG = ROOT / "configs" / "digits-cnn.yaml"
LOCK = ROOT / "requirements" / "main.txt"
TARGET_S = 3.0
STAGES = ("source", "train", "package", "deploy")


def cli(*args: str | Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")  # as `make train` exports it
    argv = [sys.executable, "-I", "-S", str(ROOT / "pipeline" / "bootstrap.py"), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"chainproof {args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc


def make_train(ws: Path) -> tuple[float, str]:
    """`make train` itself, timed whole: make, its set-up step (an mtime check when nothing
    changed), the pyenv shim if any, and `chainproof run` in workspace `ws`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    argv = [
        "make",
        "-s",
        "-C",
        str(ROOT),
        "train",
        f"CONFIG={CONFIG}",
        f"RUN_ARGS=--workspace {ws}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"make train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stderr + proc.stdout


def chainproof_noop(ws: Path, *extra: str) -> dict[str, Any]:
    if extra:
        wall, proc = cli("run", CONFIG, "--workspace", ws, *extra)
        out = proc.stderr + proc.stdout
    else:
        wall, out = make_train(ws)
    reused = [s for s in STAGES if f"[{s}] reused from run" in out]
    return {"wall_s": wall, "reused": reused, "up_to_date": "up to date: nothing ran" in out}


# ------------------------------------------------------------------ DVC


def ensure_dvc(venv: Path) -> Path | str:
    """The dvc executable of a throwaway venv (created and installed from PyPI when missing),
    or the reason it cannot be had."""
    dvc = venv / "bin" / "dvc"
    if dvc.is_file():
        return dvc
    try:
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True)
        proc = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "dvc"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot create a venv for DVC at {venv}: {e}"
    if proc.returncode != 0 or not dvc.is_file():
        return f"`pip install dvc` failed: {proc.stderr.strip()[-500:]}"
    return dvc


def dvc_project(directory: Path, run_dir: Path) -> None:
    """Four DVC stages shaped like the pipeline: the same output files and dependencies.

    Each stage's command copies the cold run's products for it (the work itself is not
    what a no-op measures); its deps are its code, the lock, its upstream outputs and, for
    train, its params."""
    directory.mkdir(parents=True)
    payload = directory / "payload"
    for stage in STAGES:
        shutil.copytree(run_dir / stage, payload / stage)
    shutil.copyfile(LOCK, directory / "main.txt")
    (directory / "params.yaml").write_text(
        "train:\n  epochs: 10\n  batch_size: 32\n  learning_rate: 0.001\n  seed: 42\n"
    )
    stages: dict[str, Any] = {}
    upstream: str | None = None
    for stage in STAGES:
        code = directory / "code" / f"{stage}.py"
        code.parent.mkdir(exist_ok=True)
        shutil.copyfile(ROOT / "stages" / f"{stage}.py", code)
        deps = [f"code/{stage}.py", "main.txt", f"payload/{stage}"]
        if upstream:
            deps.append(upstream)
        entry: dict[str, Any] = {
            "cmd": f"rm -rf {stage} && cp -r payload/{stage} {stage}",
            "deps": deps,
            "outs": [stage],
        }
        if stage == "train":
            entry["params"] = ["train.epochs", "train.batch_size", "train.learning_rate"]
        stages[stage] = entry
        upstream = stage
    import yaml

    (directory / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def dvc(dvc_bin: Path, directory: Path, *args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(dvc_bin), *args], cwd=directory, capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dvc-venv", type=Path, default=Path("/tmp/cmp-dvc"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []

    def emit(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        ws = Path(tmp) / "ws"
        # --wait-lineage: no detached MLflow process may still be running in a timed round
        cold, _ = cli("run", CONFIG, "--workspace", ws, "--wait-lineage")
        cold_run = (ws / "runs" / "latest").resolve()
        emit(bench="reuse/cold_run", wall_s=round(cold, 2), note="makes the earlier run")
        dvc_bin = ensure_dvc(args.dvc_venv)
        project = Path(tmp) / "dvc"
        if isinstance(dvc_bin, Path):
            dvc_project(project, cold_run)
            dvc(dvc_bin, project, "init", "--no-scm", "-q")
            dvc(dvc_bin, project, "repro", "-q")  # the first, real run fills dvc.lock
        else:
            print(f"skipping DVC: {dvc_bin}", flush=True)
        ours: list[dict[str, Any]] = []
        new_runs: list[dict[str, Any]] = []
        theirs: list[float] = []
        for _ in range(args.repeats):  # alternated, so load on the machine hits both alike
            ours.append(chainproof_noop(ws))
            if isinstance(dvc_bin, Path):
                theirs.append(dvc(dvc_bin, project, "repro", "-q"))
            new_runs.append(chainproof_noop(ws, "--new-run", "--wait-lineage"))
        noop = statistics.median(r["wall_s"] for r in ours)
        row: dict[str, Any] = {
            "bench": "reuse/noop_make_train",
            "make_train_noop_s": round(noop, 2),
            "target_s": TARGET_S,
            "meets_target": noop <= TARGET_S,
            "up_to_date": all(r["up_to_date"] for r in ours),
            "rounds_s": [round(r["wall_s"], 2) for r in ours],
            # --new-run: a new run anyway, every stage but deploy reused, deploy and publish
            "new_run_reusing_s": round(statistics.median(r["wall_s"] for r in new_runs), 2),
            "new_run_reused": new_runs[-1]["reused"],
            "loadavg": os.getloadavg(),
        }
        if theirs:
            d = statistics.median(theirs)
            row.update(
                dvc_repro_noop_s=round(d, 2),
                dvc_rounds_s=[round(t, 2) for t in theirs],
                ratio_chainproof_over_dvc=round(noop / d, 2),
                faster_than_dvc=noop < d,
            )
        emit(**row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reuse.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
