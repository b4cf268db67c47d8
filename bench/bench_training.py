"""Training bench: augmentation throughput, and what `make train` costs over a bare script.

    .venv/bin/python bench/bench_training.py [--repeats 3] [--rounds 3] [--no-inprocess]
                                             [--only augment|pipeline|start]

1. Augmented samples per second, same data, same knobs (the seed's ImageDataGenerator:
   rotation 20, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip, fill nearest), batch 32,
   three sides: Keras' ImageDataGenerator.flow; the stacked Keras preprocessing layers the
   train stage used before (RandomRotation, RandomTranslation, RandomShear, RandomZoom,
   RandomFlip, in a tf.data map, each resampling the whole image: `stacked_layers` below);
   and the train stage's one projective transform per image (`stages.train.augment`, the
   same tf.data pipeline make_datasets builds). tf.data: from_tensor_slices -> shuffle ->
   repeat -> batch -> map(augmentation, AUTOTUNE) -> prefetch; `.repeat()` sits after
   shuffle so every side runs for as many batches as timed. Digits at 8x8x1, and digits
   upsampled to 64x64x3 (np.kron), nearer the seed's image size. Each round uses a fresh
   iterator, warmed up, and the sides alternate, so tf.data's prefetching never runs while
   another side is timed. Targets: one transform >= 3x ImageDataGenerator at 64x64x3, and
   no slower than the stacked layers at 8x8.
2. `chainproof run configs/digits-cnn.yaml --workspace <tmp> --no-reuse` (the real CLI, cold:
   every stage runs; lineage to a fresh SQLite store in the tmp workspace, as the default
   config does) against a bare script
   that trains the same model (stages.train.build_model and make_datasets, the config's
   TrainParams, the same split of the same digits, op determinism on) for the same epochs,
   evaluates it and saves it, in a fresh `python` (its TensorFlow import and data loading
   included). Alternated, medians of --repeats. Target: (pipeline - bare) / pipeline < 15%.
   The repeats start from empty workspaces (MLflow creates its SQLite schema each time, as on
   a fresh clone); one more CLI run in the last workspace shows a later `make train`.
   Breakdown, two sources, each labelled:
   - `cli_record`: the timed CLI runs themselves: the links' `duration_ms` (stage execution)
     and the mtimes of what the runner writes in order (signed layout, each link, the release
     rename, then the exit) cut the wall time into consecutive segments. MLflow lineage is
     logged by a detached process after `run` returns; the bench waits for it outside the
     timed wall and reports how long after the release it landed in run.json.
   - `runner_inprocess`: one extra run through `pipeline.runner.run.Runner` in this process:
     `result.stage_seconds` splits each stage's runner time into its own phases (environment
     check, hashing, model scan, signing) and times the MLflow sync (`_lineage`).
3. Stage process start: the source stage process on the bundled digits against the same
   process loading them through scikit-learn first (what it did before), what sklearn.metrics
   added to the train stage, and each stage module's import alone; medians of at least 5
   alternated fresh interpreters (`--only start`).

Results: JSON lines on stdout, and bench/out/training.json (training-<part>.json with --only);
the first line names the commit and a digest of uncommitted changes, so figures can be tied
to the code they measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `pipeline` and `stages` importable

OUT = ROOT / "bench" / "out"
CONFIG = ROOT / "configs" / "digits-cnn.yaml"
BATCH = 32
SEED_KNOBS = {
    "rotation_range": 20,
    "width_shift_range": 0.2,
    "height_shift_range": 0.2,
    "shear_range": 0.2,
    "zoom_range": 0.2,
    "horizontal_flip": True,
    "fill_mode": "nearest",
}
AUGMENT_RATIO_TARGET = 3.0
OVERHEAD_SHARE_TARGET = 0.15

# The bare script a user would write without chainproof: same model, data, split and epochs.
BARE_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from stages.train import TrainParams, build_model, make_datasets
t_import = time.perf_counter()

train_params, source_params = json.loads(sys.argv[1]), json.loads(sys.argv[2])
p = TrainParams(**train_params)
digits = load_digits()
x = (digits.data.astype(np.float32) / np.float32(16)).reshape(-1, 8, 8, 1)
y = digits.target.astype(np.int64)
order = np.random.default_rng(source_params.get("seed", 42)).permutation(len(x))
n_test = max(1, int(round(len(x) * source_params.get("test_fraction", 0.2))))
test, train = order[:n_test], order[n_test:]
t_data = time.perf_counter()

keras = tf.keras
keras.utils.set_random_seed(p.seed)
tf.config.experimental.enable_op_determinism()
model = build_model(keras, x.shape[1:], 10, p)
model.compile(
    optimizer=keras.optimizers.Adam(learning_rate=p.learning_rate),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
train_ds, val_ds = make_datasets(tf, x[train], y[train], p)
model.fit(train_ds, validation_data=val_ds, epochs=p.epochs, verbose=2)
t_fit = time.perf_counter()
loss, accuracy = model.evaluate(x[test], y[test], verbose=0)
model.save("model.keras")
t_end = time.perf_counter()
print(json.dumps({
    "import_s": t_import - t0, "data_s": t_data - t_import, "fit_s": t_fit - t_data,
    "evaluate_save_s": t_end - t_fit, "test_accuracy": float(accuracy),
}))
"""


def emit(rows: list[dict[str, Any]], **fields: Any) -> None:
    rows.append(fields)
    print(json.dumps(fields), flush=True)


def r3(value: float) -> float:
    return round(value, 3)


# --------------------------------------------------------------------------- 1. augmentation


def image_data_generator(keras):
    """Keras 3 keeps the legacy class under tf.keras; standalone `keras` only in keras.src."""
    try:
        return keras.preprocessing.image.ImageDataGenerator
    except AttributeError:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator


def digits_images(size: int):
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data.astype(np.float32) / np.float32(16)).reshape(-1, 8, 8, 1)
    if size != 8:
        x = np.kron(x, np.ones((1, size // 8, size // 8, 1), np.float32))
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x), digits.target.astype(np.int64)


def _time_batches(next_batch, warmup: int, batches: int) -> float:
    """Samples per second over `batches` batches, after `warmup` untimed ones."""
    for _ in range(warmup):
        next_batch()
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        n += next_batch()
    return n / (time.perf_counter() - t0)


def stacked_layers(keras, a, seed: int) -> list:
    """The baseline: the Keras preprocessing layers the train stage stacked inside the model
    before augmentation became one transform (each layer resamples the whole image)."""
    fill = {"fill_mode": a.fill_mode, "fill_value": a.cval}
    out = []
    if a.rotation_range:
        out.append(keras.layers.RandomRotation(a.rotation_range / 360.0, seed=seed, **fill))
    if a.width_shift_range or a.height_shift_range:
        out.append(
            keras.layers.RandomTranslation(
                a.height_shift_range, a.width_shift_range, seed=seed + 1, **fill
            )
        )
    if a.shear_range:
        t = math.tan(math.radians(a.shear_range))
        out.append(keras.layers.RandomShear(x_factor=t, seed=seed + 2, **fill))
    if a.zoom_range:
        out.append(keras.layers.RandomZoom(a.zoom_range, a.zoom_range, seed=seed + 3, **fill))
    if a.horizontal_flip or a.vertical_flip:
        mode = {(True, False): "horizontal", (False, True): "vertical"}.get(
            (a.horizontal_flip, a.vertical_flip), "horizontal_and_vertical"
        )
        out.append(keras.layers.RandomFlip(mode, seed=seed + 4))
    return out


def bench_augmentation(rows: list[dict[str, Any]], size: int, batches: int, rounds: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from stages.train import Augmentation, augment

    keras = tf.keras  # the namespace the train stage uses
    knobs = Augmentation(**SEED_KNOBS)
    x, y = digits_images(size)
    idg = image_data_generator(keras)(**SEED_KNOBS)
    layers = keras.Sequential(stacked_layers(keras, knobs, seed=42))
    batched = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=42, reshuffle_each_iteration=True)
        .repeat()
        .batch(BATCH)
    )
    stacked = batched.map(
        lambda xb, yb: (layers(xb, training=True), yb), num_parallel_calls=tf.data.AUTOTUNE
    ).prefetch(tf.data.AUTOTUNE)
    one = augment(tf, batched, knobs, seed=42).prefetch(tf.data.AUTOTUNE)
    # Same output contract on every side: float32 batches of the input's shape.
    xs, _ = next(iter(stacked))
    xo, _ = next(iter(one))
    xg, _ = next(idg.flow(x, y, batch_size=BATCH, seed=42))
    assert tuple(xs.shape[1:]) == tuple(xo.shape[1:]) == tuple(xg.shape[1:]) == x.shape[1:]
    assert xo.dtype == tf.float32 and xs.dtype == tf.float32

    def tf_round(dataset) -> float:
        it = iter(dataset)
        sps = _time_batches(lambda i=it: int(next(i)[0].shape[0]), 5, batches)
        del it  # stop its prefetching before the next side is timed
        return sps

    theirs, layered, ours = [], [], []
    for r in range(rounds):  # alternate, so load from other work hits every side alike
        flow = idg.flow(x, y, batch_size=BATCH, shuffle=True, seed=r)
        theirs.append(_time_batches(lambda f=flow: len(next(f)[0]), 2, batches))
        layered.append(tf_round(stacked))
        ours.append(tf_round(one))
    t, s, o = (statistics.median(v) for v in (theirs, layered, ours))
    emit(
        rows,
        bench=f"augment/{'x'.join(map(str, x.shape[1:]))}",
        samples=len(x),
        batch_size=BATCH,
        batches_timed=batches,
        rounds=rounds,
        image_data_generator_sps=round(t),
        stacked_layers_sps=round(s),
        one_transform_sps=round(o),
        ratio_vs_image_data_generator=round(o / t, 2),
        ratio_vs_stacked_layers=round(o / s, 2),
        stacked_layers_vs_image_data_generator=round(s / t, 2),
        target_ratio_vs_image_data_generator=AUGMENT_RATIO_TARGET,
        target_met=(o / t >= AUGMENT_RATIO_TARGET) if size >= 64 else (o >= s),
        image_data_generator_rounds=[round(v) for v in theirs],
        stacked_layers_rounds=[round(v) for v in layered],
        one_transform_rounds=[round(v) for v in ours],
        stacked=[type(layer).__name__ for layer in layers.layers],
    )


# --------------------------------------------------------------------------- 2. pipeline overhead


def _stage_params(kind: str) -> dict[str, Any]:
    config = yaml.safe_load(CONFIG.read_text())
    return next(s.get("params", {}) for s in config["stages"] if s["kind"] == kind)


def run_bare(scratch: Path) -> dict[str, Any]:
    """Wall time of the bare script in a fresh interpreter, env like the runner gives a stage."""
    scratch.mkdir(parents=True)
    script = scratch / "bare_train.py"
    script.write_text(BARE_SCRIPT)
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    env.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME=str(scratch),
        TMPDIR=str(scratch),
        PYTHONHASHSEED="0",
        TF_DETERMINISTIC_OPS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
    )
    argv = [
        sys.executable,
        str(script),
        json.dumps(_stage_params("train")),
        json.dumps(_stage_params("source")),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bare script failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns / 1e9


def run_cli(workspace: Path) -> dict[str, Any]:
    """Wall time of the real CLI, and its run cut into segments from what it wrote."""
    from pipeline.provenance.links import read_link
    from pipeline.workspace import read_run_record

    cli = Path(sys.executable).parent / "chainproof"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")  # as `make train` exports it
    # --no-reuse: the figure is the cold `make train` (issue 13); the warm-store run below
    # would otherwise reuse every stage of the run before it (bench_reuse.py measures that)
    argv = [str(cli), "run", str(CONFIG), "--workspace", str(workspace), "--no-reuse"]
    spawned = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    exited = spawned + wall
    if proc.returncode != 0:
        raise RuntimeError(f"chainproof run exited {proc.returncode}:\n{proc.stderr[-3000:]}")

    run_dir = (workspace / "runs" / "latest").resolve()
    record = read_run_record(run_dir)
    links = (run_dir / record["links"]).resolve()
    segments: dict[str, float] = {}
    mark = _mtime(links / "root.layout")
    segments["cli_start_to_layout"] = mark - spawned
    execute, runner = {}, {}
    for stage in record["stages"]:
        (link_path,) = links.glob(f"{stage}.*.link")
        end = _mtime(link_path)
        execute[stage] = read_link(link_path).byproducts["duration_ms"] / 1000
        runner[stage] = (end - mark) - execute[stage]
        mark = end
    released = _mtime(Path(record["release"]).parent)  # the bundle's rename into releases/<name>
    segments["stages_runner"] = sum(runner.values())
    segments["stages_execute"] = sum(execute.values())
    segments["verify_publish"] = released - mark
    segments["cli_exit"] = exited - released  # run.json's last status, the lineage spawn, exit
    # Lineage is logged by a detached process after `run` returned: wait for it here (off the
    # timed wall), so it neither goes unrecorded nor takes CPU from the next timed side.
    from pipeline.runner.detached import wait_for_lineage

    lineage = wait_for_lineage(run_dir)
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "segments": segments,
        "stage_execute": execute,
        "stage_runner": runner,
        "lineage_logged": lineage.get("logged", False),
        "lineage_detached_s": _mtime(run_dir / "run.json") - released,
        "test_accuracy": metrics["test"]["accuracy"],
    }


def run_inprocess(workspace: Path) -> dict[str, Any]:
    """One run through the Runner in this process, for its own per-phase timings."""
    from pipeline.config import load_config
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    cfg = load_config(CONFIG)
    t0 = time.perf_counter()
    result = Runner(cfg, Workspace(workspace)).run()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stage_seconds": result.stage_seconds}


def _median_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: r3(statistics.median(d[k] for d in dicts)) for k in dicts[0]}


def bench_pipeline(rows: list[dict[str, Any]], repeats: int, inprocess: bool) -> None:
    bare, cli = [], []
    with tempfile.TemporaryDirectory(prefix="chainproof-bench-training-") as tmp:
        for i in range(repeats):  # alternate, so load from other work hits both sides alike
            bare.append(run_bare(Path(tmp) / f"bare-{i}"))
            cli.append(run_cli(Path(tmp) / f"ws-{i}"))
            emit(
                rows,
                bench="make_train/repeat",
                repeat=i + 1,
                pipeline_wall_s=r3(cli[-1]["wall_s"]),
                bare_wall_s=r3(bare[-1]["wall_s"]),
                overhead_share=r3(1 - bare[-1]["wall_s"] / cli[-1]["wall_s"]),
                lineage_logged=cli[-1]["lineage_logged"],
            )
            if i < repeats - 1:
                shutil.rmtree(Path(tmp) / f"ws-{i}")
        # Every repeat above starts from an empty workspace, so MLflow creates its SQLite
        # schema each time (a fresh clone's first `make train`). Once more in the last
        # workspace: what every later `make train` pays, with the store already there.
        warm = run_cli(Path(tmp) / f"ws-{repeats - 1}")
        fine = run_inprocess(Path(tmp) / "ws-inprocess") if inprocess else None

    p = statistics.median(c["wall_s"] for c in cli)
    b = statistics.median(r["wall_s"] for r in bare)
    share = (p - b) / p
    emit(
        rows,
        bench="make_train/overhead",
        repeats=repeats,
        pipeline_wall_s=r3(p),
        bare_wall_s=r3(b),
        overhead_s=r3(p - b),
        overhead_share=r3(share),
        ratio_pipeline_over_bare=r3(p / b),
        target_ratio=1.4,  # issue 13: `make train` cold <= 1.4x the bare script
        target_share=OVERHEAD_SHARE_TARGET,
        target_met=share < OVERHEAD_SHARE_TARGET,
        test_accuracy_pipeline=[r3(c["test_accuracy"]) for c in cli],
        test_accuracy_bare=[r3(r["test_accuracy"]) for r in bare],
    )
    emit(
        rows,
        bench="make_train/warm_store",
        method="one more CLI run in the last repeat's workspace: mlruns.db already exists",
        pipeline_wall_s=r3(warm["wall_s"]),
        bare_wall_s=r3(b),
        overhead_s=r3(warm["wall_s"] - b),
        overhead_share=r3(1 - b / warm["wall_s"]),
        target_met=1 - b / warm["wall_s"] < OVERHEAD_SHARE_TARGET,
        segments_s={k: r3(v) for k, v in warm["segments"].items()},
    )
    emit(
        rows,
        bench="make_train/bare_split",
        method="timestamps inside the bare script; median of repeats",
        **_median_dicts([{k: v for k, v in r.items() if k.endswith("_s")} for r in bare]),
    )
    segments = _median_dicts([c["segments"] for c in cli])
    execute = _median_dicts([c["stage_execute"] for c in cli])
    emit(
        rows,
        bench="make_train/breakdown_cli_record",
        method=(
            "the timed CLI runs: links' byproducts.duration_ms = stage execution; "
            "consecutive mtimes of root.layout, each link, the release rename and run.json's "
            "last write = the rest; median of repeats"
        ),
        segments_s=segments,
        stage_execute_s=execute,
        stage_runner_s=_median_dicts([c["stage_runner"] for c in cli]),
        # What the pipeline pays beyond the bare script, by where it goes.
        overhead_s={
            "cli_start_to_layout": segments["cli_start_to_layout"],
            "runner_per_stage": segments["stages_runner"],
            "other_stages_execute": r3(sum(v for k, v in execute.items() if k != "train")),
            "train_stage_minus_bare_script": r3(execute["train"] - b),
            "verify_publish": segments["verify_publish"],
            "cli_exit": segments["cli_exit"],
        },
        lineage_detached_off_critical_path_s=r3(
            statistics.median(c["lineage_detached_s"] for c in cli)
        ),
    )
    if fine is not None:
        stage_seconds = fine["stage_seconds"]
        per_stage = {
            s: {k: r3(v) for k, v in t.items()} for s, t in stage_seconds.items() if s != "_lineage"
        }
        accounted = sum(sum(t.values()) for t in stage_seconds.values())
        phases = list(dict.fromkeys(k for t in per_stage.values() for k in t))
        emit(
            rows,
            bench="make_train/breakdown_runner_inprocess",
            method="one extra run via Runner in this process: result.stage_seconds",
            run_wall_s=r3(fine["wall_s"]),
            # the Runner's own phase names, summed over stages: env_check, materials (hash),
            # execute, products (hash + model scan), sign (link)
            phases_s={k: r3(sum(t.get(k, 0.0) for t in per_stage.values())) for k in phases},
            lineage_s=r3(stage_seconds.get("_lineage", {}).get("sync", 0.0)),
            start_verify_publish_rest_s=r3(fine["wall_s"] - accounted),
            per_stage=per_stage,
        )


# --------------------------------------------------------------------------- 3. stage start


def _stage_env(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MPLBACKEND": "Agg",
    }


def _wall(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=_stage_env(cwd), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall


def bench_stage_start(rows: list[dict[str, Any]], repeats: int) -> None:
    """What a stage process pays before its own work, against what it paid for scikit-learn.

    Source: the whole stage process on the bundled digits (`python -I -m stages.source SPEC`,
    as the runner starts it), against the same process first doing what the stage used to do,
    `from sklearn.datasets import load_digits; load_digits()`. Train: what sklearn.metrics,
    which it imported for per-class metrics, cost on top of TensorFlow. Every stage kind: the
    import of its module alone. Alternated, medians of `repeats` fresh interpreters.
    """
    spec = {
        "run_id": "bench",
        "stage": "source",
        "params": _stage_params("source"),
        "inputs": {},
        "outputs": ["dataset.npz", "manifest.json"],
    }
    run_source = "import runpy, sys; sys.argv = ['stages.source', sys.argv[1]]; "
    run_source += "runpy.run_module('stages.source', run_name='__main__', alter_sys=True)"
    py = sys.executable
    # What sklearn.metrics adds to the train stage once TensorFlow is imported (Keras' own
    # scikit-learn wrappers already import sklearn itself): too small to see in wall time
    # on a loaded machine, so taken from the interpreter's import timer.
    timed = subprocess.run(
        [py, "-X", "importtime", "-I", "-c", "import tensorflow, sklearn.metrics"],
        env=_stage_env(Path(tempfile.gettempdir())),
        capture_output=True,
        text=True,
    )
    metrics_us = [
        int(line.split("|")[1])
        for line in timed.stderr.splitlines()
        if line.rstrip().endswith("| sklearn.metrics")
    ]
    with tempfile.TemporaryDirectory(prefix="chainproof-bench-start-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        sides = {
            "source_stage": [py, "-I", "-m", "stages.source", str(spec_file)],
            "source_with_load_digits": [
                py,
                "-I",
                "-c",
                "from sklearn.datasets import load_digits; load_digits(); " + run_source,
                str(spec_file),
            ],
            **{
                f"import_stages_{kind}": [py, "-I", "-c", f"import stages.{kind}"]
                for kind in ("source", "train", "package", "deploy")
            },
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(repeats):
            for name, argv in sides.items():
                times[name].append(_wall(argv, Path(tmp)))
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(
        rows,
        bench="stage_start/source",
        repeats=repeats,
        stage_process_s=r3(med["source_stage"]),
        baseline_with_load_digits_s=r3(med["source_with_load_digits"]),
        ratio=round(med["source_with_load_digits"] / med["source_stage"], 2),
        saved_s=r3(med["source_with_load_digits"] - med["source_stage"]),
    )
    emit(
        rows,
        bench="stage_start/train_sklearn_metrics",
        method="python -X importtime: cumulative import of sklearn.metrics after tensorflow",
        saved_s=r3(metrics_us[0] / 1e6) if metrics_us else None,
    )
    emit(
        rows,
        bench="stage_start/module_import",
        repeats=repeats,
        **{k.removeprefix("import_"): r3(v) for k, v in med.items() if k.startswith("import_")},
    )


def code_state() -> dict[str, Any]:
    """Which code the figures belong to: the commit, and a digest of uncommitted changes."""
    import hashlib

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    diff = git("diff", "HEAD")
    return {
        "commit": git("rev-parse", "HEAD").strip() or "unknown",
        "changed_files": len(git("status", "--porcelain").splitlines()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pipeline/bare pairs")
    parser.add_argument("--rounds", type=int, default=3, help="augmentation rounds per side")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process run")
    parser.add_argument("--only", choices=("augment", "pipeline", "start"), help="one part only")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    emit(rows, bench="training/context", **code_state())
    # The pipeline first: this process has not imported TensorFlow yet.
    if args.only in (None, "pipeline"):
        bench_pipeline(rows, args.repeats, not args.no_inprocess)
    if args.only in (None, "start"):
        bench_stage_start(rows, max(args.repeats, 5))
    if args.only in (None, "augment"):
        bench_augmentation(rows, 8, batches=200, rounds=args.rounds)
        bench_augmentation(rows, 64, batches=80, rounds=args.rounds)
    emit(
        rows,
        bench="training/total",
        bench_wall_s=round(time.perf_counter() - t0, 1),
        loadavg_1m=round(os.getloadavg()[0], 2),
    )
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"training-{args.only}.json" if args.only else "training.json"
    (OUT / name).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
