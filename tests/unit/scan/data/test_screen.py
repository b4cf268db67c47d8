"""scan data: each detector finds what it is for on small synthetic data; hostile .npz files
are refused with exit 2; findings name the rows of the input exactly as given."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import run_cli
from pipeline.errors import InputError
from pipeline.scan.data.dataset import load
from pipeline.scan.data.interface import Dataset
from pipeline.scan.data.policy import ScreenPolicy
from pipeline.scan.data.screen import screen

ROOT = Path(__file__).resolve().parents[4]


def blobs(per_class: int = 60, classes: int = 4, dim: int = 16, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (classes, dim))
    y = np.repeat(np.arange(classes), per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    order = rng.permutation(len(y))
    return Dataset(x=x[order], y=y[order], name="blobs")


def policy(*detectors: str, **kw: object) -> ScreenPolicy:
    return ScreenPolicy.model_validate({"detectors": list(detectors), **kw})


def flagged(report, kind: str) -> set[int]:
    return {f.index for f in report.findings if f.kind == kind}


def test_flipped_labels_are_label_issues() -> None:
    data = blobs()
    y = data.y.copy()
    flipped = np.arange(0, 240, 24)  # ten rows, relabelled to the next class
    y[flipped] = (y[flipped] + 1) % 4
    report = screen(Dataset(x=data.x, y=y, name="flips"), policy("labels"))
    found = flagged(report, "label-issue")
    assert len(found & set(flipped.tolist())) >= 9  # heuristic: nearly all, few false alarms
    assert len(found - set(flipped.tolist())) <= 3


def test_a_patch_trigger_is_a_backdoor_and_clean_data_is_not() -> None:
    data = blobs(per_class=80)
    clean = screen(data, policy("backdoor"))
    assert len(flagged(clean, "backdoor")) <= 2
    x, y = data.x.copy(), data.y.copy()
    poison = np.flatnonzero(y != 0)[:12]  # other classes, patched and relabelled as class 0
    x[np.ix_(poison, [0, 1, 2])] = 12.0
    y[poison] = 0
    report = screen(Dataset(x=x, y=y, name="badnets"), policy("backdoor"))
    assert set(poison.tolist()) <= flagged(report, "backdoor")
    assert report.verdict == "fail"
    assert report.failed_kinds["backdoor"][0] >= 12


def test_duplicates_and_leaks_name_the_rows_as_given(tmp_path: Path) -> None:
    data = blobs()
    x_train = np.vstack([data.x, data.x[[5]]])  # row 240 repeats row 5
    y_train = np.append(data.y, data.y[5])
    x_test = np.vstack([data.x[[7]] + 1e-9, np.full((1, 16), 50.0)])  # test row 0 = train row 7
    path = tmp_path / "split.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=np.array([0, 1]))
    report = screen(load(path), policy("duplicates"))
    dup = [f for f in report.findings if f.kind == "duplicate"]
    assert [(f.index, f.split) for f in dup] == [(240, "train")]
    assert "row 5" in dup[0].detail
    leaks = [f for f in report.findings if f.kind == "leak"]
    assert [(f.index, f.split) for f in leaks] == [(0, "test")]
    assert "train row 7" in leaks[0].detail
    assert report.verdict == "fail"


def test_balance_and_outliers() -> None:
    data = blobs(per_class=60)
    keep = np.flatnonzero((data.y != 3) | (np.cumsum(data.y == 3) <= 5))  # class 3: 5 rows
    x, y = data.x[keep].copy(), data.y[keep]
    x[10] = 100.0
    report = screen(Dataset(x=x, y=y, name="skewed"), policy("balance", "outliers"))
    assert flagged(report, "class-imbalance") == set(np.flatnonzero(y == 3).tolist())
    assert 10 in flagged(report, "outlier")
    assert report.to_dict()["summary"]["detectors"]["balance"]["underrepresented"] == [3]


def test_warn_records_findings_without_failing() -> None:
    data = blobs()
    x = np.vstack([data.x, data.x[:5]])
    y = np.append(data.y, data.y[:5])
    report = screen(Dataset(x=x, y=y, name="d"), policy("duplicates", action="warn"))
    assert report.verdict == "warn" and len(flagged(report, "duplicate")) == 5


def _cli(*args: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = blobs()
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=data.x.reshape(-1, 4, 4), y=data.y)  # rows of any shape, counted as given
    pol = tmp_path / "policy.yaml"
    pol.write_text("detectors: [duplicates, balance]\nfail_at: {duplicate: 0.0}\n")
    code, out, _ = _cli("scan", "data", clean, "--format", "json", "--policy", pol, capsys=capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["findings"] == [] and doc["summary"]["verdict"] == "pass"
    dirty = tmp_path / "dirty.npz"
    np.savez(dirty, x=np.vstack([data.x, data.x[[3]]]), y=np.append(data.y, data.y[3]))
    code, out, err = _cli("scan", "data", dirty, "--format", "json", "--policy", pol, capsys=capsys)
    assert code == 1, err
    assert [f["index"] for f in json.loads(out)["findings"]] == [240]
    assert "data screen failed" in err


def test_bad_policy_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    pol = tmp_path / "p.yaml"
    pol.write_text("detectors: [magic]\n")
    code, _, err = _cli("scan", "data", data, "--policy", pol, capsys=capsys)
    assert code == 2 and "invalid screen policy" in err


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: np.savez(p, x=np.array([object()] * 3), y=np.arange(3)), "pickles are never"),
        (lambda p: np.savez(p, a=np.zeros(3)), "must hold arrays x and y"),
        (lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), "not a readable .npz"),
        (lambda p: np.savez(p, x=np.array([[1.0, np.nan]] * 2), y=np.arange(2)), "NaN"),
        (lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.arange(2)), "one label per row"),
        (lambda p: np.savez(p, x=np.array(["a", "b"]), y=np.arange(2)), "not numeric"),
        (lambda p: np.savez(p, x=np.zeros((2, 2)), y=np.array([-1, 0])), "labels must be"),
    ],
)
def test_hostile_npz_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write, message: str
) -> None:
    path = tmp_path / "bad.npz"
    write(path)
    code, _, err = _cli("scan", "data", path, capsys=capsys)
    assert code == 2, err
    assert message in err


def test_decoded_size_is_capped_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a small zip whose member claims a huge array: refused from its header, nothing allocated
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 64)}
            )
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(2, dtype=np.int64))
    with pytest.raises(InputError) as e:  # exit 2, like every over-the-cap input
        load(path)
    assert "CHAINPROOF_MAX_DATA_BYTES" in e.value.message
    monkeypatch.setenv("CHAINPROOF_MAX_DATA_BYTES", "1000")
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((200, 2)), y=np.zeros(200, dtype=np.int64))
    with pytest.raises(InputError):
        load(small)


def test_a_run_directory_screens_its_canonical_dataset(tmp_path: Path) -> None:
    data = blobs()
    (tmp_path / "source").mkdir()
    np.savez(
        tmp_path / "source" / "dataset.npz",
        x_train=data.x,
        y_train=data.y,
        x_test=data.x[:3],
        y_test=data.y[:3],
    )
    loaded = load(tmp_path)
    assert len(loaded.y) == 240 and loaded.x_test is not None and len(loaded.x_test) == 3


def test_the_cli_never_imports_tensorflow(tmp_path: Path) -> None:
    data = blobs()
    path = tmp_path / "d.npz"
    np.savez(path, x=data.x, y=data.y)
    code = (
        "import sys; from pipeline.cli import run_cli; "
        f"rc = run_cli(['scan', 'data', {str(path)!r}, '--format', 'json']); "
        "print('TF' if 'tensorflow' in sys.modules else 'noTF'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip().endswith("noTF"), proc.stderr
