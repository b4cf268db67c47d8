"""Pickle streams and pickle containers (PyTorch, joblib): every malicious sample flagged at
its opcode, clean ones pass, hostile streams end in findings."""

from __future__ import annotations

import json
import pickle
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from pipeline.scan.model.report import Finding
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def _ids(samples: list[ms.Sample], malicious: bool) -> list[str]:
    return [s.name for s in samples if s.malicious is malicious]


EVIL = [
    "os_system.pkl",
    "os_system_proto0.pkl",
    "exec.pkl",
    "runpy.pkl",
    "popen.pkl",
    "methodcaller_importlib.pkl",
    "partial.pkl",
    "timeit.pkl",
    "numpy_runstring.pkl",
    "stack_shuffle.pkl",
    "evil_torch.pt",
    "object_array.npy",
    "evil.joblib",
]
CLEAN = [
    "clean.pkl",
    "clean_torch.pt",
    "clean.npy",
    "clean.npz",
    "clean.safetensors",
    "clean.joblib",
]


@pytest.mark.parametrize("name", EVIL)
def test_malicious_sample_is_critical_with_location(
    name: str, samples: list[ms.Sample], sentinel: Path
) -> None:
    sample = next(s for s in samples if s.name == name)
    report = scan_path(sample.path)
    assert report.max_severity is Severity.CRITICAL
    hits = _only(report, sample.rule or "")
    assert hits, report.findings
    loc = hits[0].location
    assert loc.file == name
    assert isinstance(loc.offset, int) and loc.offset >= 0
    assert loc.op in {"GLOBAL", "STACK_GLOBAL", "INST"}
    for key, value in sample.where.items():
        assert getattr(loc, key) == value
    assert not report.ok()
    assert not sentinel.exists()


def test_catalogue_names_match(samples: list[ms.Sample]) -> None:
    assert sorted(EVIL) == sorted(_ids(samples, True))
    assert sorted(CLEAN) == sorted(_ids(samples, False))


@pytest.mark.parametrize("name", CLEAN)
def test_clean_sample_has_no_findings(name: str, samples: list[ms.Sample]) -> None:
    sample = next(s for s in samples if s.name == name)
    report = scan_path(sample.path)
    assert report.findings == ()
    assert report.ok("info")
    assert report.files and report.files[0].sha256


def test_payload_call_is_reported_with_its_arguments(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "os_system.pkl"))
    (hit,) = report.findings
    assert "posix.system" in hit.message or "os.system" in hit.message
    assert "touch " in hit.message and "REDUCE" in hit.message


def test_stack_global_is_resolved_through_memo_and_pop(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "stack_shuffle.pkl"))
    (hit,) = report.findings
    assert "imports os.system" in hit.message
    assert hit.location.op == "STACK_GLOBAL"


def test_methodcaller_chain_flags_both_gadgets(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "methodcaller_importlib.pkl"))
    text = " ".join(f.message for f in report.findings)
    assert "operator.methodcaller" in text and "importlib.import_module" in text


def test_unresolvable_stack_global_is_critical(tmp_path: Path) -> None:
    # STACK_GLOBAL whose module name is a call result, not a string literal.
    data = b"\x80\x04" + b"\x8c\x08builtins\x8c\x03str\x93)R" + b"\x8c\x06system\x93."
    (tmp_path / "x.pkl").write_bytes(data)
    report = scan_path(tmp_path / "x.pkl")
    assert [f.rule for f in report.findings if f.severity is Severity.CRITICAL] == [
        "pickle-unresolved-import"
    ]


def test_unknown_callable_is_high_not_passed(tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(Fraction(1, 3), protocol=2))
    report = scan_path(tmp_path / "m.pkl")
    assert report.max_severity is Severity.HIGH
    assert _only(report, "pickle-unsafe-import")[0].message.startswith("imports fractions.")


def test_hostile_pickles_end_in_findings_not_crashes(tmp_path: Path) -> None:
    hostile = {  # name: (bytes, is it malformed?)
        "deep.pkl": (b"\x80\x04)" + b"\x85" * 200_000 + b".", False),  # a tuple 200k deep
        "cycle.pkl": (b"\x80\x04]\x94h\x00a" * 50 + b".", False),  # list appended to itself
        "huge_len.pkl": (b"\x80\x04\x8e" + (2**60).to_bytes(8, "little"), True),  # "1 EiB"
        "underflow.pkl": (b"\x80\x04R.", True),
        "bad_get.pkl": (b"\x80\x04h\x07.", True),
    }
    for name, (data, malformed) in hostile.items():
        (tmp_path / name).write_bytes(data)
        rules = [f.rule for f in scan_path(tmp_path / name).findings]
        assert rules == (["pickle-malformed"] if malformed else []), name


def test_deeply_nested_keras_config_is_a_finding(tmp_path: Path) -> None:
    doc = "[" * 5000 + "]" * 5000
    (tmp_path / "config.json").write_text(
        json.dumps({"class_name": "Sequential", "config": {}})[:-1] + ', "x": ' + doc + "}"
    )
    assert scan_path(tmp_path / "config.json").max_severity is Severity.HIGH


def test_malformed_pickle_is_a_finding(tmp_path: Path) -> None:
    (tmp_path / "t.pkl").write_bytes(ms.pickle_truncated())
    report = scan_path(tmp_path / "t.pkl")
    (hit,) = report.findings
    assert hit.rule == "pickle-malformed" and hit.severity is Severity.HIGH
    assert not report.ok()


def test_second_pickle_stream_is_scanned_too(tmp_path: Path, sentinel: Path) -> None:
    data = pickle.dumps({"ok": 1}) + ms.pickle_os_system(sentinel)
    (tmp_path / "two.pkl").write_bytes(data)
    report = scan_path(tmp_path / "two.pkl")
    (hit,) = report.findings
    assert hit.severity is Severity.CRITICAL and hit.location.key == "pickle stream 1"


@pytest.mark.parametrize("evil", [False, True])
def test_legacy_torch_save_streams_then_raw_storage(
    tmp_path: Path, sentinel: Path, evil: bool
) -> None:
    model = ms.pickle_os_system(sentinel, protocol=2) if evil else pickle.dumps({"w": 1}, 2)
    streams = [
        pickle.dumps(0x1950A86A20F9469CFC6C, 2),
        pickle.dumps(1001, 2),
        pickle.dumps({"little_endian": True}, 2),
        model,
        pickle.dumps(["0"], 2),
    ]
    (tmp_path / "old.pt").write_bytes(b"".join(streams) + b"\x07raw tensor bytes\xff" * 10)
    rules = [f.rule for f in scan_path(tmp_path / "old.pt").findings]
    assert rules == (["pickle-dangerous-import"] if evil else [])


def test_pickle_magic_in_an_unknown_extension_is_scanned(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "weights.model").write_bytes(ms.pickle_os_system(sentinel))
    assert scan_path(tmp_path / "weights.model").max_severity is Severity.CRITICAL


# --- allowlist profiles ----------------------------------------------------------------------


def _sklearn_model() -> bytes:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]
    y = [0, 1, 0, 1]
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y)
    linear = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    return pickle.dumps({"forest": forest, "linear": linear}, protocol=4)


def test_sklearn_model_needs_the_sklearn_profile(tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(_sklearn_model())
    default = scan_path(tmp_path / "m.pkl")
    assert default.max_severity is Severity.HIGH
    assert all("allow the sklearn profile" in f.message for f in default.findings)
    assert scan_path(tmp_path / "m.pkl", profiles=["sklearn"]).findings == ()


def test_sklearn_profile_never_allows_what_runs_code(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "e.pkl").write_bytes(ms.pickle_os_system(sentinel))
    assert scan_path(tmp_path / "e.pkl", profiles=["sklearn"]).max_severity is Severity.CRITICAL
    # A function (not an estimator class) or a downloader inside sklearn stays a finding.
    (tmp_path / "f.pkl").write_bytes(b"\x80\x04\x8c\x10sklearn.datasets\x8c\x0cfetch_openml\x93)R.")
    assert not scan_path(tmp_path / "f.pkl", profiles=["sklearn"]).ok()


def test_torch_profile_can_be_left_out(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(ms.torch_zip(ms.torch_style_clean_pickle()))
    assert scan_path(tmp_path / "m.pt").findings == ()
    strict = scan_path(tmp_path / "m.pt", profiles=["numpy"])
    assert strict.max_severity is Severity.HIGH
    assert "allow the torch profile" in strict.findings[0].message


def test_unknown_profile_is_an_input_error(tmp_path: Path) -> None:
    from pipeline.errors import InputError

    (tmp_path / "m.pkl").write_bytes(pickle.dumps([1]))
    with pytest.raises(InputError, match="unknown allowlist profile"):
        scan_path(tmp_path / "m.pkl", profiles=["tensorflow"])
