"""The source stage on image folders and archives: pinned by the manifest digest, decoded to
the configured size and channels, split by path hash, written as shards; bad files refused
naming them (or skipped and listed when the config says so)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.datasets import digest_path
from pipeline.stage import StageContext, StageError
from stages._images import split_key
from stages._io import read_npz
from stages.source import IMAGE_OUTPUTS, SourceParams, SourceStage
from tools.make_image_folder import make_image_folder

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("img") / "digits", 120)


def run_source(work: Path, **params) -> dict:
    p = SourceParams(**params)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        run_id="r",
        stage="source",
        params=p,
        workdir=work,
        inputs={},
        outputs=SourceStage.outputs_for(p),
    )
    SourceStage().run(ctx)
    return json.loads((work / "manifest.json").read_text())


def pin(path: Path) -> str:
    return digest_path(path)[1].digest


def shards_of(work: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        read_npz(work / "shards" / s["file"]) for s in manifest["shards"] if s["split"] == split
    ]
    return np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])


def test_a_folder_becomes_shards_and_a_manifest_pinned_by_its_digest(folder, tmp_path) -> None:
    digest = pin(folder)
    m = run_source(tmp_path / "w", path=str(folder), sha256=digest, shard_size=32)
    work = tmp_path / "w"
    # the product named data-manifest.json is exactly the pinned bytes
    assert (work / "data-manifest.json").read_bytes() == digest_path(folder)[1].canonical_bytes()
    assert m["source"]["sha256"] == digest and m["source"]["files"] == 120
    assert m["classes"] == 10 and m["class_names"] == [str(i) for i in range(10)]
    assert m["input_shape"] == [64, 64, 3] and m["scale"] == 255.0
    assert m["split"]["train"] + m["split"]["test"] == 120
    assert all(s["rows"] <= 32 for s in m["shards"])
    x, y = shards_of(work, m, "train")
    assert x.dtype == np.uint8 and x.shape == (m["split"]["train"], 64, 64, 3)
    assert set(y.tolist()) <= set(range(10))
    assert sorted(p.name for p in (work / "shards").iterdir()) == sorted(
        s["file"] for s in m["shards"]
    )


def test_decoding_matches_the_file_and_the_class_folder(folder, tmp_path) -> None:
    m = run_source(tmp_path / "w", path=str(folder), sha256=pin(folder))
    x, y = shards_of(tmp_path / "w", m, "test")
    # the test shard's first image is the test file with the smallest split key
    test_files = sorted(
        (split_key(42, p.relative_to(folder).as_posix()), p)
        for p in folder.rglob("*.png")
        if split_key(42, p.relative_to(folder).as_posix()) < 0.2
    )
    first = test_files[0][1]
    assert np.array_equal(x[0], np.asarray(Image.open(first).convert("RGB")))
    assert y[0] == int(first.parent.name)


def test_resizing_and_channels_follow_the_config(folder, tmp_path) -> None:
    m = run_source(
        tmp_path / "w", path=str(folder), sha256=pin(folder), image_size=(32, 16), channels=1
    )
    x, _ = shards_of(tmp_path / "w", m, "train")
    assert x.shape[1:] == (32, 16, 1) and m["input_shape"] == [32, 16, 1]
    again = run_source(
        tmp_path / "v", path=str(folder), sha256=pin(folder), image_size=(32, 16), channels=1
    )
    assert again["shards"] == m["shards"]  # deterministic: the same shard digests


def test_adding_files_moves_no_other_file_between_train_and_test(folder, tmp_path) -> None:
    bigger = tmp_path / "bigger"
    shutil.copytree(folder, bigger)
    for i in range(30):
        shutil.copy(folder / "3" / "000003.png", bigger / "3" / f"extra{i}.png")
    before = {f.path: split_key(42, f.path) < 0.2 for f in digest_path(folder)[1].files}
    after = {f.path: split_key(42, f.path) < 0.2 for f in digest_path(bigger)[1].files}
    assert all(after[p] == side for p, side in before.items())
    m = run_source(tmp_path / "w", path=str(bigger), sha256=pin(bigger))
    assert m["split"]["train"] + m["split"]["test"] == 150


@pytest.mark.parametrize("container", ["zip", "gztar"])
def test_an_archive_of_the_folder_has_the_folder_s_digest_and_shards(
    folder, tmp_path, container
) -> None:
    archive = shutil.make_archive(str(tmp_path / "digits"), container, folder.parent, "digits")
    assert pin(Path(archive)) == pin(folder)
    a = run_source(tmp_path / "a", path=archive, sha256=pin(folder))
    f = run_source(tmp_path / "f", path=str(folder), sha256=pin(folder))
    assert a["shards"] == f["shards"]
    assert a["source"]["container"] in ("zip", "tar")


@pytest.mark.parametrize("kind", ["changed", "added", "removed"])
def test_a_tampered_folder_is_refused_naming_the_file_and_both_digests(
    folder, tmp_path, kind
) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    pinned = digest_path(data)[1]
    (tmp_path / "pinned.json").write_bytes(pinned.canonical_bytes())
    target = "5/000005.png"
    if kind == "changed":
        (data / target).write_bytes((data / target).read_bytes()[:-1] + b"\0")
    elif kind == "added":
        shutil.copy(data / "4/000004.png", data / target.replace("000005", "new"))
        target = target.replace("000005", "new")
    else:
        (data / target).unlink()
    with pytest.raises(StageError) as e:
        run_source(
            tmp_path / "w",
            path=str(data),
            sha256=pinned.digest,
            manifest=str(tmp_path / "pinned.json"),
        )
    assert f"{kind}: {target}" in e.value.message
    assert pinned.digest in e.value.message and pin(data) in e.value.message
    assert not (tmp_path / "w" / "data-manifest.json").exists()


def test_a_manifest_that_is_not_the_pinned_one_is_refused(folder, tmp_path) -> None:
    (tmp_path / "other.json").write_bytes(digest_path(folder)[1].canonical_bytes())
    with pytest.raises(StageError, match="not the pinned manifest"):
        run_source(
            tmp_path / "w", path=str(folder), sha256="0" * 64, manifest=str(tmp_path / "other.json")
        )


def broken_copy(folder: Path, tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    png = (data / "7" / "000007.png").read_bytes()
    (data / "7" / "000007.png").write_bytes(png[: len(png) // 2])  # truncated
    (data / "2" / "notes.png").write_text("not an image")
    return data, pin(data)


def test_a_truncated_or_non_image_file_is_refused_naming_it(folder, tmp_path) -> None:
    data, digest = broken_copy(folder, tmp_path)
    with pytest.raises(StageError) as e:
        run_source(tmp_path / "w", path=str(data), sha256=digest)
    assert "2/notes.png" in e.value.message or "7/000007.png" in e.value.message
    assert "0x" not in e.value.message  # no object address: the same message every run
    assert "on_unreadable: skip" in (e.value.hint or "")


def test_skipped_files_are_listed_when_the_config_says_so(folder, tmp_path) -> None:
    data, digest = broken_copy(folder, tmp_path)
    m = run_source(tmp_path / "w", path=str(data), sha256=digest, on_unreadable="skip")
    assert [s["path"] for s in m["skipped"]] == ["2/notes.png", "7/000007.png"]
    assert m["source"]["files"] == 121 and m["examples"] == 119


def test_an_image_mode_that_cannot_be_converted_is_refused(folder, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    Image.new("I;16", (8, 8)).save(data / "1" / "deep.tif")  # 16-bit TIFF
    Image.new("F", (8, 8)).save(data / "1" / "float.tif")
    # Pillow converts these (clipping); what it cannot read is refused, never a crash
    m = run_source(tmp_path / "w", path=str(data), sha256=pin(data), on_unreadable="skip")
    assert m["examples"] + len(m["skipped"]) == 122


def test_an_oversized_image_is_refused_from_its_header(folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINPROOF_MAX_IMAGE_PIXELS", "4000")
    with pytest.raises(StageError, match=r"64x64 pixels, more than the 4000-pixel cap"):
        run_source(tmp_path / "w", path=str(folder), sha256=pin(folder))


def test_a_labels_file_instead_of_class_folders(tmp_path) -> None:
    data = tmp_path / "flat"
    data.mkdir()
    rows = ["path,label"]
    for i in range(40):
        Image.new("RGB", (10, 10), (i * 6, 0, 0)).save(data / f"{i}.png")
        rows.append(f"{i}.png,{'red' if i % 2 else 'dark'}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    m = run_source(tmp_path / "w", path=str(data), sha256=pin(data), labels="labels.csv")
    assert m["class_names"] == ["dark", "red"] and m["examples"] == 40
    (data / "labels.csv").unlink()  # every other file is an example: it would be refused
    (data / "labels.json").write_text(json.dumps({f"{i}.png": i % 2 for i in range(39)}))
    with pytest.raises(StageError, match=r"39.png has no label in labels.json"):
        run_source(tmp_path / "v", path=str(data), sha256=pin(data), labels="labels.json")


def test_loose_files_without_class_folders_are_refused(tmp_path) -> None:
    data = tmp_path / "flat"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(data / "a" / "1.png")
    Image.new("RGB", (4, 4)).save(data / "b.png")
    with pytest.raises(StageError, match="b.png .* is not in a class folder"):
        run_source(tmp_path / "w", path=str(data), sha256=pin(data))


def test_image_params_are_checked_when_the_config_is() -> None:
    assert SourceParams(path="d", sha256="0" * 64).images
    assert SourceParams(path="d.tar.gz", sha256="0" * 64).images
    assert not SourceParams(path="d.npz", sha256="0" * 64).images
    assert SourceStage.outputs_for(SourceParams(path="d", sha256="0" * 64)) == IMAGE_OUTPUTS
    assert SourceStage.outputs_for(SourceParams()) == ("dataset.npz", "manifest.json")
    with pytest.raises(ValidationError, match="apply to image folders and archives only"):
        SourceParams(path="d.npz", sha256="0" * 64, labels="x.csv")
    with pytest.raises(ValidationError, match="MiB a shard"):
        SourceParams(path="d", sha256="0" * 64, image_size=(1024, 1024), shard_size=1024)
    with pytest.raises(ValidationError, match="images use image_size"):
        SourceParams(path="d", sha256="0" * 64, image_shape=(8, 8, 1))
    # a validated config is dumped with its defaults and validated again in the stage
    dumped = SourceParams(dataset="sklearn-digits").model_dump(mode="json")
    assert not SourceParams.model_validate(dumped).images


def test_the_source_process_imports_neither_tensorflow_nor_sklearn(folder, tmp_path) -> None:
    code = (
        "import sys; from pathlib import Path; from stages.source import *; "
        "from pipeline.stage import StageContext; "
        f"p = SourceParams(path={str(folder)!r}, sha256={pin(folder)!r}); "
        f"SourceStage().run(StageContext(run_id='r', stage='s', params=p, "
        f"workdir=Path({str(tmp_path)!r}), inputs={{}}, outputs=SourceStage.outputs_for(p))); "
        "print(sorted(m for m in ('tensorflow', 'sklearn', 'keras') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith("[]")


@pytest.mark.parametrize(
    "member, message",
    [("../../evil.png", "escapes the dataset"), ("digits/3/link.png", "is a symlink")],
)
def test_a_hostile_archive_is_refused_by_the_stage(folder, tmp_path, member, message) -> None:
    import stat
    import zipfile

    archive = Path(shutil.make_archive(str(tmp_path / "digits"), "zip", folder.parent, "digits"))
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(member)
        if "link" in member:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(StageError, match=message):
        run_source(tmp_path / "w", path=str(archive), sha256="0" * 64)
    assert not (tmp_path / "w" / "shards").exists()


def test_a_bomb_archive_is_refused_by_the_stage(tmp_path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.png", b"\0" * (16 << 20))
        zf.writestr("b/zeros.png", b"\0" * 10)
    with pytest.raises(StageError, match="zip bomb"):
        run_source(tmp_path / "w", path=str(tmp_path / "bomb.zip"), sha256="0" * 64)


def test_an_archive_url_is_downloaded_then_pinned_like_a_folder(folder, tmp_path) -> None:
    import functools
    import http.server
    import threading

    archive = Path(
        shutil.make_archive(str(tmp_path / "srv" / "digits"), "gztar", folder.parent, "digits")
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{archive.name}"
        params = SourceParams(url=url, sha256=pin(folder))
        assert params.images and SourceStage.needs_network(params)
        m = run_source(tmp_path / "w", url=url, sha256=pin(folder))
    finally:
        server.shutdown()
    assert m["source"]["kind"] == "url" and m["source"]["location"] == url
    assert m["source"]["sha256"] == pin(folder) and m["source"]["container"] == "tar"


def test_the_images_cnn_config_pins_what_the_tool_makes_with_the_seed_s_model(tmp_path) -> None:
    from pipeline.config import load_config
    from stages.train import TrainParams

    config = load_config(ROOT / "configs" / "images-cnn.yaml")
    source, train = config.stage("source"), config.stage("train")
    assert source.outputs == IMAGE_OUTPUTS
    made = make_image_folder(tmp_path / "digits-images", 1797)
    assert pin(made) == source.params["sha256"]
    t = TrainParams.model_validate(dict(train.params))
    assert [(s.type, s.filters, s.kernel_size, s.activation, s.pool_size) for s in t.layers] == [
        ("conv2d", 32, 3, "relu", None),
        ("maxpool2d", None, None, None, 2),
        ("flatten", None, None, None, None),
    ]
    a = t.augmentation
    assert (a.rotation_range, a.width_shift_range, a.height_shift_range) == (20, 0.2, 0.2)
    assert (a.shear_range, a.zoom_range, a.horizontal_flip, a.fill_mode) == (
        0.2,
        0.2,
        True,
        "nearest",
    )
    assert source.params["image_size"] == [64, 64] and source.params["channels"] == 3
