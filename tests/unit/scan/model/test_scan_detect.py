"""Format decided as the loader decides: by extension and content, every reading judged, a file
that is two formats at once reported; non-model files in a directory listed, not failed."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from tests import model_samples as ms


def _rules(report: ScanReport) -> set[str]:
    return {f.rule for f in report.findings}


def _lambda_model() -> dict:
    return ms.sequential_config(ms.lambda_layer("lam"), ms.dense_layer())


def test_h5_user_block_holding_a_pickle_is_read_both_ways(tmp_path: Path) -> None:
    # The first bytes are a harmless pickle, so a first-bytes sniff says "pickle"; h5py finds
    # the superblock at 512 and Keras would run the Lambda in model_config.
    path = ms.h5_with_user_block(tmp_path / "m.h5", pickle.dumps({"a": 1}), _lambda_model())
    report = scan_path(path)
    assert {"polyglot", "keras-lambda"} <= _rules(report)
    lam = next(f for f in report.findings if f.rule == "keras-lambda")
    assert lam.location.layer == "lam" and lam.severity is Severity.CRITICAL
    assert "hdf5 (user block of 512 bytes)" in next(
        f.message for f in report.findings if f.rule == "polyglot"
    )


def test_h5_user_block_of_zeros_is_clean(tmp_path: Path) -> None:
    clean = ms.sequential_config(ms.dense_layer())
    report = scan_path(ms.h5_with_user_block(tmp_path / "m.h5", b"", clean))
    assert report.findings == ()
    assert report.files[0].format == "hdf5"


def test_zip_with_prepended_data_is_still_opened(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(b"\x00junk" * 300 + ms.keras_zip(_lambda_model()))
    report = scan_path(tmp_path / "m.keras")
    assert "keras-lambda" in _rules(report)
    assert report.files[0].format == "zip"


def test_clean_keras_zip_is_not_a_polyglot(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(ms.keras_zip(ms.sequential_config(ms.dense_layer())))
    assert scan_path(tmp_path / "m.keras").findings == ()


def test_pickle_with_a_zip_appended_is_a_polyglot(tmp_path: Path, sentinel: Path) -> None:
    # torch.load opens the zip (found by its end record); pickle.load runs the stream at 0.
    inner = ms.torch_zip(ms.torch_style_clean_pickle())
    (tmp_path / "m.pt").write_bytes(ms.pickle_os_system(sentinel) + inner)
    report = scan_path(tmp_path / "m.pt")
    assert {"polyglot", "pickle-dangerous-import"} <= _rules(report)
    assert not sentinel.exists()


def test_npy_named_file_with_pickle_content_is_read_as_pickle(
    tmp_path: Path, sentinel: Path
) -> None:
    # np.load(allow_pickle=True) falls back to pickle.load for bytes that are not .npy/.npz.
    (tmp_path / "w.npy").write_bytes(ms.pickle_os_system(sentinel, protocol=0))
    assert scan_path(tmp_path / "w.npy").max_severity is Severity.CRITICAL


def _release_dir(root: Path) -> Path:
    root.mkdir()
    (root / "model.keras").write_bytes(ms.keras_zip(ms.sequential_config(ms.dense_layer())))
    (root / "model_card.json").write_text('{"name": "digits", "metrics": {"accuracy": 0.98}}')
    (root / "model_card.md").write_text("# digits\n")
    (root / "VERIFY.md").write_text("chainproof verify .\n")
    (root / "README.md").write_text("readme\n")
    (root / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    (root / "keys").mkdir()
    (root / "keys" / "owner.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n")
    (root / "requirements.lock").write_text("numpy==2.0 --hash=sha256:00\n")
    (root / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return root


def test_release_directory_passes_with_non_models_listed(tmp_path: Path) -> None:
    report = scan_path(_release_dir(tmp_path / "release"))
    assert report.ok(), report.findings
    listed = {f.location.file for f in report.findings if f.rule == "not-a-model"}
    assert listed == {
        "README.md",
        "VERIFY.md",
        "keys/owner.pub",
        "loss.png",
        "model_card.md",
        "requirements.lock",
        "vocab.txt",
    }
    assert all(f.severity is Severity.INFO for f in report.findings)


@pytest.mark.parametrize("name", ["weights.h5", "model.pt", "model.onnx"])
def test_unreadable_file_with_a_model_name_in_a_directory_is_refused(
    tmp_path: Path, name: str
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(b"\xff\xfe not really a model")
    report = scan_path(tmp_path / "d")
    assert not report.ok()
    assert "not-a-model" not in _rules(report)


def test_model_hidden_under_a_document_name_is_still_judged(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_bytes(ms.pickle_os_system(sentinel))
    report = scan_path(tmp_path / "d")
    assert report.max_severity is Severity.CRITICAL


def test_safetensors_named_file_that_is_also_a_zip(tmp_path: Path, sentinel: Path) -> None:
    # A safetensors loader reads the header; zipfile (torch.load, np.load) finds the zip.
    inner = ms.torch_zip(ms.pickle_os_system(sentinel))
    (tmp_path / "m.safetensors").write_bytes(ms.safetensors_bytes() + inner)
    report = scan_path(tmp_path / "m.safetensors")
    assert {"polyglot", "pickle-dangerous-import", "safetensors-malformed"} <= _rules(report)
    assert scan_path(_write(tmp_path / "ok.safetensors", ms.safetensors_bytes())).findings == ()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
