"""Distributed training on this machine: 1 against 2 MultiWorkerMirroredStrategy workers.

    .venv/bin/python bench/bench_distributed.py [--epochs 2]

1. The same pipeline (the bundled digits, the seed's CNN, global batch 32, seed 7) through the
   real runner in this process, with `distribution: {strategy: multi_worker_mirrored,
   workers: N}` for N = 1 and 2, and once without distribution (Keras' model.fit, the
   single-process path) as a reference. Per run: the train stage's wall time (the runner's
   `execute` phase: every worker from start to exit), and from each worker's log line
   `chainproof-timing` (written by the stage, never in a product): steps, the first step
   (tracing, the ring's set-up), the mean of the other steps, an all-reduce of the
   gradients' size timed alone, and its share of a step. Whether 1 and 2 workers end with the
   same weights (the logged weights digests).
2. The runner's overhead per worker, without TensorFlow: Workers.execute of `python -I -c
   pass` for 1, 2 and 4 workers under bubblewrap (the loopback holder, nsenter, one sandbox
   per worker, supervision) against sandbox.execute of the same command once, medians of 5
   alternated rounds; and one fresh environment check of the lock (each start of workers
   does one: on one machine they share the interpreter).

2 CPU cores, shared: expect no speed-up from a second worker here (both replicas compete for
the same cores and pay the all-reduce); the figures say how much the distribution costs, not
what a cluster gains. Results: JSON lines, and bench/out/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
ROUNDS = 5

CONFIG = """
schema: 1
name: bench-dist
lock: {lock}
stages:
  - name: source
    kind: source
    params: {{dataset: sklearn-digits, seed: 7}}
  - name: train
    kind: train
    needs: [source]
    timeout: 3600
    params: {params}
"""


def train_run(tmp: Path, label: str, params: str) -> dict:
    from pipeline.config import load_config
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    cfg_path = tmp / label / "pipeline.yaml"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(
        CONFIG.format(lock=ROOT / "requirements" / "main.txt", params=params), encoding="utf-8"
    )
    result = Runner(load_config(cfg_path), Workspace(tmp / label / "ws")).run(publish=False)
    timings = []
    digests = []
    for log in sorted((result.run_dir / "logs").glob("train*.stdout")):
        for line in log.read_text().splitlines():
            if line.startswith("chainproof-timing "):
                timings.append(json.loads(line.split(" ", 1)[1]))
            elif line.startswith("weights sha256 "):
                digests.append(line.split()[-1])
    metrics = json.loads((result.run_dir / "train" / "metrics.json").read_text())
    row = {
        "bench": "distributed-train",
        "side": label,
        "path": metrics["training"]["path"],
        "train_stage_s": round(result.stage_seconds["train"]["execute"], 2),
        "test_accuracy": metrics["test"]["accuracy"],
        "weights": digests[:1],
    }
    if timings:
        row.update(
            steps=timings[0]["steps"],
            first_step_s=round(max(t["first_step_s"] for t in timings), 3),
            step_ms=round(1000 * statistics.mean(t["step_s"] for t in timings), 2),
            allreduce_ms=round(1000 * statistics.mean(t["allreduce_s"] for t in timings), 2),
            collective_share=round(statistics.mean(t["collective_share"] for t in timings), 3),
            workers_agree=len(set(digests)) == 1,
        )
    return row


def overhead(tmp: Path) -> list[dict]:
    from pipeline.envcheck import check_environment, parse_lock
    from pipeline.runner import sandbox as sb
    from pipeline.runner.distributed import Plan, Workers, environment_check

    box = sb.find_bubblewrap()
    argv = [sys.executable, "-I", "-c", "pass"]
    lock = parse_lock(ROOT / "requirements" / "main.txt")
    fp = check_environment(lock, verify_files=False)
    times: dict[str, list[float]] = {"single": [], "1": [], "2": [], "4": []}
    for r in range(ROUNDS):
        for side in times:
            root = tmp / f"o{r}-{side}"
            (root / "work").mkdir(parents=True)
            (root / "logs").mkdir()
            kw = dict(
                workdir=root / "work",
                scratch=root / "tmp" / "s",
                logs=sb.StageLogs(root / "logs/s.stdout", root / "logs/s.stderr"),
                timeout=120,
                sandbox=box,
            )
            t0 = time.perf_counter()
            if side == "single":
                sb.execute(argv, **kw)  # type: ignore[arg-type]
            else:
                Workers(Plan("s", int(side)), lambda: fp).execute(argv, **kw)  # type: ignore[arg-type]
            times[side].append(time.perf_counter() - t0)
    base = statistics.median(times["single"])
    rows = []
    for n in ("1", "2", "4"):
        med = statistics.median(times[n])
        rows.append(
            {
                "bench": "distributed-overhead",
                "workers": int(n),
                "median_s": round(med, 3),
                "single_stage_s": round(base, 3),
                "per_worker_s": round((med - base) / int(n), 3),
                "note": "python -I -c pass per worker; the difference is the loopback holder, "
                "nsenter, the sandboxes and the supervision loop (0.2 s poll)",
            }
        )
    t0 = time.perf_counter()
    environment_check(lock, Path(sys.executable), verify_files=True)()
    rows.append(
        {
            "bench": "distributed-envcheck",
            "fresh_check_s": round(time.perf_counter() - t0, 2),
            "note": "once per start of the workers (one interpreter on one machine)",
        }
    )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        base = f"epochs: {args.epochs}, seed: 7"
        mwms = "distribution: {strategy: multi_worker_mirrored, workers: %d}"
        sides = {
            "keras_fit": f"{{{base}}}",
            "1-worker": f"{{{base}, {mwms % 1}}}",
            "2-workers": f"{{{base}, {mwms % 2}}}",
        }
        for label, params in sides.items():
            row = train_run(Path(tmp), label, params)
            rows.append(row)
            print(json.dumps(row), flush=True)
        one, two = rows[1], rows[2]
        summary = {
            "bench": "distributed-summary",
            "wall_2_over_1": round(two["train_stage_s"] / one["train_stage_s"], 2),
            "step_2_over_1": round(two["step_ms"] / one["step_ms"], 2),
            "same_weights_1_and_2_workers": one["weights"] == two["weights"],
        }
        rows.append(summary)
        print(json.dumps(summary), flush=True)
        for row in overhead(Path(tmp)):
            rows.append(row)
            print(json.dumps(row), flush=True)
    (OUT / "distributed.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
