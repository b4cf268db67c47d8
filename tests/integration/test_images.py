"""An image folder through the real pipeline: pinned by its manifest digest, streamed from
shards by the train stage, named by that digest and its file count in the link, MLflow, the
model card and the ML-BOM; a changed file refused before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import digest_path
from pipeline.provenance.links import read_link
from pipeline.stage import StageContext
from stages._shards import Shards
from stages.source import SourceParams, SourceStage
from tests.conftest import chainproof, write_config
from tools.make_image_folder import make_image_folder

pytestmark = [pytest.mark.tensorflow]

IMAGES_PIPELINE = """
schema: 1
name: images-small
lock: @MAIN_LOCK@
layout:
  expires_days: 7
stages:
  - name: source
    kind: source
    params:
      path: @DATA@
      sha256: @PIN@
      manifest: @MANIFEST@
      shard_size: 64
      seed: 3
  - name: train
    kind: train
    needs: [source]
    params:
      layers:
        - {type: conv2d, filters: 32, kernel_size: 3, activation: relu}
        - {type: maxpool2d, pool_size: 2}
        - {type: flatten}
      augmentation: {rotation_range: 20, width_shift_range: 0.2, height_shift_range: 0.2,
                     shear_range: 0.2, zoom_range: 0.2, horizontal_flip: true}
      epochs: 1
      batch_size: 32
      shuffle_buffer: 128
      seed: 3
  - name: package
    kind: package
    needs: [train]
  - name: deploy
    kind: deploy
    needs: [package]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "digits", 300)


def test_streamed_shards_give_every_training_image_once_per_epoch(folder, tmp_path) -> None:
    import tensorflow as tf

    p = SourceParams(path=str(folder), sha256=digest_path(folder)[1].digest, shard_size=40)
    SourceStage().run(
        StageContext(
            run_id="r",
            stage="source",
            params=p,
            workdir=tmp_path,
            inputs={},
            outputs=SourceStage.outputs_for(p),
        )
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shards = Shards.from_manifest(manifest, tmp_path)
    kw = {"batch_size": 16, "validation_split": 0.25}
    fit = shards.dataset(tf, "fit", shuffle_buffer=50, seed=1, **kw)
    val = shards.dataset(tf, "val", **kw)

    def epoch(ds) -> list[tuple[int, float]]:
        return [
            (int(y), float(x.numpy().sum())) for xb, yb in ds for x, y in zip(xb, yb, strict=True)
        ]

    first, second, held = epoch(fit), epoch(fit), epoch(val)
    n_train = manifest["split"]["train"]
    assert len(first) + len(held) == n_train == len(second) + len(held)
    assert sorted(first) == sorted(second) and first != second  # reshuffled each epoch
    assert len(held) == shards.validation_rows(0.25) > 0
    x, _ = next(iter(fit))
    assert x.dtype == tf.float32 and x.shape[1:] == (64, 64, 3)
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
    again = shards.dataset(tf, "fit", shuffle_buffer=50, seed=1, **kw)
    assert epoch(again) == first  # the same seed, the same order: reproducible
    assert shards.labels("test").shape == (manifest["split"]["test"],)
    assert np.all(shards.labels("test") < 10)


@pytest.mark.slow
def test_an_image_folder_runs_end_to_end_pinned_by_its_manifest_digest(folder, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    _, manifest = digest_path(data)
    (tmp_path / "data.manifest.json").write_bytes(manifest.canonical_bytes())
    body = (
        IMAGES_PIPELINE.replace("@DATA@", str(data))
        .replace("@PIN@", manifest.digest)
        .replace("@MANIFEST@", str(tmp_path / "data.manifest.json"))
    )
    ws = tmp_path / "ws"
    config = write_config(ws, body)
    proc = chainproof("run", config, "--workspace", ws, "--wait-lineage", cwd=ws, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = (ws / "runs" / "latest").resolve()
    links = ws / "attestations" / "runs" / run_dir.name

    # the source link: tens of products, not one per image; the manifest's digest is the pin
    (source_link,) = links.glob("source.*.link")
    products = read_link(source_link).products
    assert products["source/data-manifest.json"]["sha256"] == manifest.digest
    assert len(products) < 20 and any(n.startswith("source/shards/train-") for n in products)
    (train_link,) = links.glob("train.*.link")
    assert "source/data-manifest.json" in read_link(train_link).materials

    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert metrics["dataset"]["sha256"] == manifest.digest
    assert metrics["dataset"]["input_shape"] == [64, 64, 3]
    card = json.loads((run_dir / "package" / "model_card.json").read_text())
    assert card["training_data"]["source"]["files"] == 300
    assert card["training_data"]["sha256"] == manifest.digest
    assert "the manifest of 300 image files" in (run_dir / "package" / "model_card.md").read_text()
    bom = json.loads((run_dir / "package" / "bom.cdx.json").read_text())
    (data_component,) = [c for c in bom["components"] if c.get("bom-ref") == "dataset"]
    props = {p["name"]: p["value"] for p in data_component["data"][0]["contents"]["properties"]}
    assert props["chainproof:origin-sha256"] == manifest.digest
    assert props["chainproof:files"] == "300"
    assert data_component["hashes"][0]["content"] == manifest.digest

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "images-small"]
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`chainproof.stage` = 'train'"
    )
    (ds_input,) = runs[0].inputs.dataset_inputs
    assert ds_input.dataset.digest == f"sha256:{manifest.digest[:29]}"
    input_tags = {t.key: t.value for t in ds_input.tags}
    assert input_tags["chainproof.sha256"] == manifest.digest
    assert input_tags["chainproof.files"] == "300"

    # then one image changes: the next run is refused at the source, naming it and both digests
    target = data / "4" / "000004.png"
    target.write_bytes(target.read_bytes() + b"\0")
    proc = chainproof("run", config, "--workspace", ws, cwd=ws, timeout=600)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "changed: 4/000004.png" in proc.stderr
    assert manifest.digest in proc.stderr and digest_path(data)[1].digest in proc.stderr


@pytest.mark.slow
def test_streamed_training_gives_byte_identical_weights(folder, tmp_path) -> None:
    """What `chainproof reproduce` needs: the same shards, seed and lock -> the same bytes."""
    import hashlib
    import os
    import subprocess
    import sys

    from stages.train import TrainParams, TrainStage

    root = Path(__file__).resolve().parents[2]
    p = SourceParams(path=str(folder), sha256=digest_path(folder)[1].digest, shard_size=64)
    (tmp_path / "source").mkdir()
    SourceStage().run(
        StageContext(
            run_id="r",
            stage="source",
            params=p,
            workdir=tmp_path / "source",
            inputs={},
            outputs=SourceStage.outputs_for(p),
        )
    )
    params = TrainParams(
        epochs=1, augmentation={"rotation_range": 20, "horizontal_flip": True}, shuffle_buffer=100
    )
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = str(root)
    digests = []
    for i in range(2):
        work = tmp_path / f"train{i}"
        work.mkdir()
        spec = {
            "run_id": "r",
            "stage": "train",
            "params": params.model_dump(mode="json"),
            "inputs": {"source": "../source"},
            "outputs": list(TrainStage.outputs),
            "extra": {},
        }
        (tmp_path / f"t{i}.json").write_text(json.dumps(spec))
        subprocess.run(
            [sys.executable, "-m", "stages.train", f"../t{i}.json"],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
            timeout=900,
        )
        digests.append(hashlib.sha256((work / "model.keras").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
