"""What lineage shows people and what the release pyfunc accepts, without MLflow or TensorFlow."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.lineage import Dataset, Trail, example_rows, lineage_markdown, model_signature

DATA = "d" * 64
WEIGHTS = "e" * 64


def test_the_input_example_is_the_first_rows_of_the_held_out_split(tmp_path: Path) -> None:
    x = np.arange(20 * 8 * 8, dtype=np.float64).reshape(20, 8, 8, 1) / 1e4
    np.savez(tmp_path / "dataset.npz", x_test=x, y_test=np.zeros(20))
    rows = example_rows(tmp_path / "dataset.npz", "x_test")
    assert rows is not None and rows.dtype == np.float32 and rows.shape == (5, 8, 8, 1)
    assert np.allclose(rows, x[:5])


def test_an_npz_that_claims_a_huge_array_gives_no_example_quickly(tmp_path: Path) -> None:
    """The header says 10^12 rows; only the first few are ever read, and the short file is
    noticed (no example) instead of read whole."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 8, 8, 1)}
    )
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
        zf.writestr("x_test.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 100)
    t0 = time.monotonic()
    assert example_rows(tmp_path / "huge.npz", "x_test") is None
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(
    "arrays",
    [
        {"x_test": np.array([object(), 1], dtype=object)},  # a pickled object array
        {"y_test": np.zeros(3)},  # no x_test
    ],
)
def test_no_example_from_an_npz_that_is_not_plain_numbers(tmp_path: Path, arrays) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    assert example_rows(tmp_path / "d.npz", "x_test") is None
    (tmp_path / "not.npz").write_bytes(b"not a zip")
    assert example_rows(tmp_path / "not.npz", "x_test") is None


def test_the_signature_comes_from_the_card_and_the_evaluated_classes() -> None:
    card = {"input": {"dtype": "float32", "shape": [8, 8, 1], "range": [0, 1]}}
    sig = model_signature(card, 10)
    assert sig.inputs.inputs[0].shape == (-1, 8, 8, 1)
    assert sig.outputs.inputs[0].shape == (-1, 10)
    assert model_signature({"input": {"shape": "8x8"}}, 10) is None, "an older card: inferred"
    assert model_signature({"input": {"shape": [8], "dtype": "object"}}, 10) is None


def test_the_markdown_lineage_names_every_digest_in_full() -> None:
    trail = Trail(run_id="R1", release=Path("/ws/releases/digits/v7"))
    trail.dataset = Dataset("source/dataset.npz", DATA, Path("x"), None, {})
    trail.links = [("source", "source.ab.link", "a" * 64), ("train", "train.ab.link", "b" * 64)]
    trail.weights = WEIGHTS
    text = lineage_markdown(trail, model="digits", version="3", alias=True, verification="passed")
    order = [text.index(s) for s in (DATA, "a" * 64, "b" * 64, WEIGHTS, "digits/v7")]
    assert order == sorted(order), "data -> links -> weights -> release, in that order"
    assert "version **3**, alias **production**; verification: **passed**" in text


class FakeKeras:
    input_shape = (None, 8, 8, 1)

    def predict(self, x: np.ndarray, verbose: int = 0) -> np.ndarray:
        return np.full((len(x), 10), 0.1)


@pytest.fixture
def pyfunc():
    from pipeline.release import pyfunc_model

    model = pyfunc_model.ChainproofReleaseModel()
    model.model = FakeKeras()
    model.input_shape = (8, 8, 1)
    model.input_range = (0.0, 1.0)
    return model


def test_the_pyfunc_refuses_what_serve_refuses(pyfunc) -> None:
    ok = np.zeros((2, 8, 8, 1))
    assert pyfunc.predict(None, ok).shape == (2, 10)
    assert pyfunc.predict(None, ok.reshape(2, 64)).shape == (2, 10), "flattened rows"
    with pytest.raises(InputError, match="finite"):
        pyfunc.predict(None, np.full((1, 8, 8, 1), np.nan))
    with pytest.raises(InputError, match=r"64 of 64 value\(s\) lie outside \[0, 1\]"):
        pyfunc.predict(None, np.full((1, 8, 8, 1), 16.0))
    with pytest.raises(InputError, match=r"shape \[8, 8, 1\]"):
        pyfunc.predict(None, np.zeros((1, 5)))


def test_the_configured_owner_key_wins_and_none_at_all_is_refused(monkeypatch) -> None:
    from pipeline.release.pyfunc_model import OWNER_KEY_ENV, owner_key_for

    monkeypatch.delenv(OWNER_KEY_ENV, raising=False)
    assert owner_key_for({"owner_key": "a" * 64}) == "a" * 64
    monkeypatch.setenv(OWNER_KEY_ENV, "b" * 64)
    assert owner_key_for({"owner_key": "a" * 64}) == "b" * 64
    monkeypatch.delenv(OWNER_KEY_ENV)
    with pytest.raises(InputError) as info:
        owner_key_for(None)
    assert OWNER_KEY_ENV in (info.value.hint or "")
