"""Image-dataset bench: pinning and ingesting a generated image folder, side by side with DVC.

    .venv/bin/python bench/bench_datasets.py [--files 100000] [--train-sizes 10000,100000]
                                             [--rounds 2] [--no-dvc] [--no-train]

1. Pinning: `chainproof data digest DIR` (the CLI as a user runs it) and the source stage
   process (`python -I -m stages.source`, as the runner starts it: hash, check the pin,
   decode every PNG to 64x64x3, split, write the shards) against `dvc add DIR` of the same
   folder in a fresh DVC repo each round (DVC installed by pip into a throwaway venv under
   bench/out/; the side is skipped, with the reason, when it cannot be installed). Warm page
   cache (one untimed digest first), sides alternated, best of --rounds. Target: each of
   ours >= 3x faster than `dvc add`.
2. Memory: the source stage's peak RSS (wait4's ru_maxrss of its process) at --files;
   target < 500 MiB at 100k files.
3. The train stage process (1 epoch of the seed's CNN, no augmentation) on the source
   stage's shards at each of --train-sizes: its peak RSS should be flat across sizes (the
   shards are streamed), so the figure is the ratio largest / smallest; target <= 1.25.

The folder is tools/make_image_folder.py's (the bundled digits upscaled to 64x64 RGB PNGs,
each file distinct), made once under bench/out/datasets/ and reused. Results: JSON lines on
stdout and bench/out/datasets.json, the first line naming the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DATA = OUT / "datasets"
PY = sys.executable
CHAINPROOF = [PY, "-I", "-S", str(ROOT / "pipeline" / "bootstrap.py")]
MIB = 1024 * 1024

sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds and peak RSS (MiB) of one process, from wait4 (that process alone)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text}\n{errors[-3000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def folder(files: int) -> Path:
    from tools.make_image_folder import make_image_folder

    path = DATA / f"images-{files}"
    done = path.with_suffix(".done")
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        make_image_folder(path, files)
        done.write_text("ok\n")
    return path


def digest_of(path: Path) -> str:
    from pipeline.datasets import digest_path

    return digest_path(path)[1].digest


def source_stage(path: Path, pin: str, work: Path) -> dict[str, Any]:
    """The source stage process on `path`, as the runner starts it (spec file, own dir)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "tmp").mkdir(parents=True)
    from stages.source import SourceParams, SourceStage

    params = SourceParams(path=str(path), sha256=pin)
    spec = {
        "run_id": "bench",
        "stage": "source",
        "params": params.model_dump(mode="json"),
        "inputs": {},
        "outputs": list(SourceStage.outputs_for(params)),
        "extra": {"external": {"path": str(path)}},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "source").mkdir()
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "PYTHONHASHSEED": "0"}
    return timed([PY, "-I", "-m", "stages.source", "../spec.json"], cwd=work / "source", env=env)


def train_stage(source_work: Path) -> dict[str, Any]:
    from stages.train import TrainParams, TrainStage

    work = source_work / "train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    params = TrainParams(epochs=1, batch_size=64, validation_split=0.1)
    spec = {
        "run_id": "bench",
        "stage": "train",
        "params": params.model_dump(mode="json"),
        "inputs": {"source": "../source"},
        "outputs": list(TrainStage.outputs),
        "extra": {},
    }
    (source_work / "train-spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TMPDIR": str(source_work / "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return timed([PY, "-I", "-m", "stages.train", "../train-spec.json"], cwd=work, env=env)


def dvc_venv() -> tuple[Path | None, str]:
    """A throwaway venv with DVC from PyPI; (its dvc, version) or (None, why not)."""
    venv = OUT / "dvc-venv"
    dvc = venv / "bin" / "dvc"
    if not dvc.exists():
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([PY, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            return None, f"cannot create a venv: {made.stderr.strip()[-300:]}"
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "dvc"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if pip.returncode != 0:
            return None, f"pip install dvc failed: {pip.stderr.strip()[-300:]}"
    version = subprocess.run([str(dvc), "--version"], capture_output=True, text=True)
    if version.returncode != 0:
        return None, f"dvc does not start: {version.stderr.strip()[-300:]}"
    return dvc, version.stdout.strip()


def dvc_add(dvc: Path, path: Path, repo: Path) -> dict[str, Any]:
    """`dvc add` of a hard-linked copy of `path` in a fresh repo (no cache, no state db)."""
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(path), str(repo / "data")], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=repo, check=True, env=env)
    # its site cache (hash state) inside the fresh repo, so no round reuses an earlier one
    site = repo / ".site-cache"
    subprocess.run(
        [str(dvc), "config", "core.site_cache_dir", str(site)], cwd=repo, check=True, env=env
    )
    subprocess.run([str(dvc), "config", "core.autostage", "false"], cwd=repo, check=True, env=env)
    return timed([str(dvc), "add", "-q", "data"], cwd=repo, env=env)


def commit_line() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True
        ).stdout

    return {
        "bench": "datasets",
        "commit": git("rev-parse", "HEAD").strip() or "unknown",
        "changed_files": len(git("status", "--porcelain").splitlines()),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--train-sizes", default="10000,100000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-dvc", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = [commit_line()]

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(json.dumps(rows[0]), flush=True)
    path = folder(args.files)
    pin = digest_of(path)  # also warms the page cache
    dvc, why = (None, "--no-dvc") if args.no_dvc else dvc_venv()
    best: dict[str, dict[str, Any]] = {}
    work = OUT / "datasets-work"
    for r in range(args.rounds):
        sides = [
            (
                "chainproof data digest",
                lambda: timed([*CHAINPROOF, "data", "digest", str(path)], cwd=ROOT),
            ),
            ("source stage", lambda: source_stage(path, pin, work / f"src-{args.files}")),
        ]
        if dvc is not None:
            sides.append(("dvc add", lambda: dvc_add(dvc, path, OUT / "datasets-work" / "dvc")))
        if r % 2:
            sides.reverse()
        for name, fn in sides:
            got = fn()
            if name not in best or got["seconds"] < best[name]["seconds"]:
                best[name] = got
    for name, got in best.items():
        emit({"part": "pin", "side": name, "files": args.files, **got})
    if dvc is None:
        emit({"part": "pin", "side": "dvc add", "skipped": why})
    else:
        base = best["dvc add"]["seconds"]
        for name in ("chainproof data digest", "source stage"):
            emit(
                {
                    "part": "pin",
                    "ratio": f"dvc add / {name}",
                    "value": round(base / best[name]["seconds"], 2),
                    "target": ">= 3",
                    "dvc": why,
                }
            )
    emit(
        {
            "part": "memory",
            "side": "source stage",
            "files": args.files,
            "peak_rss_mib": round(best["source stage"]["peak_rss_mib"], 1),
            "target": "< 500",
        }
    )
    if not args.no_train:
        sizes = [int(s) for s in args.train_sizes.split(",") if s]
        rss = {}
        for n in sizes:
            p = folder(n)
            work = OUT / "datasets-work" / f"train-{n}"
            source_stage(p, digest_of(p), work)
            got = train_stage(work)
            rss[n] = got["peak_rss_mib"]
            emit({"part": "train", "images": n, **got})
        emit(
            {
                "part": "train",
                "ratio": f"peak RSS at {max(sizes)} / at {min(sizes)} images",
                "value": round(rss[max(sizes)] / rss[min(sizes)], 3),
                "target": "<= 1.25 (flat)",
            }
        )
    (OUT / "datasets.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
