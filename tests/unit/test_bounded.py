"""Bounded parsing of hostile input: each cap refuses before the work it protects, naming the
file and the cap, and every reader of links, layouts, Statements, run records, configs, keys,
OpenSSF signatures and source data turns a bad file into its category's error."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from pipeline import bounded
from pipeline.config import load_config
from pipeline.errors import ConfigError, Error, InputError, VerificationError
from pipeline.provenance.keys import load_public_key
from pipeline.provenance.links import read_link, write_link
from pipeline.provenance.statements import (
    payload_of,
    read_verified_statement,
    statement,
    write_signed_statement,
)
from pipeline.workspace import read_run_record

MIB = 1024 * 1024
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def _link(directory: Path, signer: CryptoSigner) -> Path:
    return write_link(
        directory,
        name="source",
        materials={},
        products={"source/dataset.npz": {"sha256": "0" * 64}},
        command=["python", "-m", "stages.source"],
        byproducts={"return-value": 0},
        environment={"run_id": "r1"},
        signer=signer,
    )


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- size


def test_a_link_padded_to_512_mib_is_refused_unread_naming_the_cap(
    tmp_path: Path, signer: CryptoSigner
) -> None:
    path = _link(tmp_path, signer)
    with open(path, "ab") as fh:  # sparse: 512 MiB on paper, nothing on disk
        fh.truncate(512 * MIB)
    before, t0 = _maxrss_mib(), time.perf_counter()
    with pytest.raises(bounded.LimitExceeded) as info:
        read_link(path)
    assert time.perf_counter() - t0 < 2
    assert _maxrss_mib() - before < 50  # it was never read, let alone parsed
    assert f"is {512 * MIB} bytes, more than the {16 * MIB}-byte cap" in info.value.message
    assert "$CHAINPROOF_MAX_RECORD_BYTES" in info.value.message
    assert str(path) in info.value.message and info.value.exit_code == 2


def test_the_size_cap_is_configurable_by_environment_and_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"a": "x" * 1000}))
    assert bounded.read_json(path)["a"] == "x" * 1000
    monkeypatch.setenv("CHAINPROOF_MAX_RECORD_BYTES", "100")
    with pytest.raises(bounded.LimitExceeded, match="more than the 100-byte cap"):
        bounded.read_json(path, what="record")
    assert bounded.read_json(path, max_bytes=4096)["a"]  # an explicit int wins for one call
    monkeypatch.setenv("CHAINPROOF_MAX_RECORD_BYTES", "lots")
    with pytest.raises(InputError, match="CHAINPROOF_MAX_RECORD_BYTES='lots' is not a positive"):
        bounded.read_json(path)


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.link"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(InputError, match="is not a regular file"):
            bounded.read_bytes(path, what="link")


def test_a_missing_file_is_left_to_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bounded.read_json(tmp_path / "absent.json")


# --------------------------------------------------------------------------- depth


def test_a_100k_deep_link_is_refused_before_the_parser_recurses(
    tmp_path: Path,
) -> None:
    path = tmp_path / "source.abcdef12.link"
    path.write_bytes(DEEP)
    with pytest.raises(bounded.LimitExceeded, match="nests values more than 64 deep") as info:
        read_link(path)
    assert "$CHAINPROOF_MAX_DEPTH" in info.value.message and str(path) in info.value.message


def test_a_deep_dsse_payload_inside_a_shallow_envelope_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "source.abcdef12.link"
    payload = base64.b64encode(DEEP).decode()
    path.write_text(
        json.dumps(
            {"payload": payload, "payloadType": "application/vnd.in-toto+json", "signatures": []}
        )
    )
    with pytest.raises(bounded.LimitExceeded, match="the payload of link .* nests values"):
        read_link(path)


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-1MiB"])
def test_nesting_counts_brackets_outside_strings_only(big: bool) -> None:
    pad = b" " * (2 * MIB) if big else b""
    ok = b'{"a": ["[[[[[[", "\\"[[[", "\\\\", {"b": "]]]]"}]}' + pad
    assert bounded.loads_json(ok, source="x") == {"a": ["[[[[[[", '"[[[', "\\", {"b": "]]]]"}]}
    assert bounded.loads_json(b"[" * 64 + b"]" * 64 + pad, source="x")
    with pytest.raises(bounded.LimitExceeded):
        bounded.loads_json(b"[" * 65 + b"]" * 65 + pad, source="x")
    assert bounded.loads_json(b"[[[1]]]", source="x", max_depth=3) == [[[1]]]
    with pytest.raises(bounded.LimitExceeded, match="more than 2 deep"):
        bounded.loads_json(b"[[[1]]]", source="x", max_depth=2)


def test_a_big_text_with_many_brackets_is_scanned_as_strictly(tmp_path: Path) -> None:
    flat = b"[" + b"[]," * 1_500_000 + b"[]]"  # 3M brackets: past the plain loop's share
    assert len(bounded.loads_json(flat, source="x")) == 1_500_001
    with pytest.raises(bounded.LimitExceeded):
        bounded.loads_json(b"[" * 65 + b"[]," * 1_500_000 + b"]" * 65, source="x")


def test_the_depth_scan_is_linear_on_a_16_mib_worst_case() -> None:
    half = 8 * MIB
    for data in (b"[" * half + b"]" * half, b"[]" * half, b'\\"' * half, b"\\" * 2 * half):
        t0 = time.perf_counter()
        with contextlib.suppress(bounded.LimitExceeded):
            bounded.check_nesting(data, source="x")
        assert time.perf_counter() - t0 < 10


def test_not_json_and_not_utf8_are_bad_input() -> None:
    for data, message in (
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"{", "is not valid JSON"),
        (b"1" * 5000, "is not valid JSON"),  # past Python's integer digit limit
    ):
        with pytest.raises(InputError, match=message):
            bounded.loads_json(data, source="x")


# --------------------------------------------------------------------------- YAML

BOMB = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def test_a_yaml_alias_bomb_is_refused_quickly_naming_the_line_and_cap(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    before, t0 = _maxrss_mib(), time.perf_counter()
    with pytest.raises(bounded.LimitExceeded) as info:
        bounded.read_yaml(path, what="config")
    assert time.perf_counter() - t0 < 2 and _maxrss_mib() - before < 50
    assert "aliases expand this document past the 100000-node cap" in info.value.message
    assert "$CHAINPROOF_MAX_YAML_NODES" in info.value.message and info.value.line is not None


def test_yaml_aliases_within_the_budget_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {x: 1}\nother: {<<: *b, y: 2}\nlist: [*b, *b]\n")
    assert bounded.read_yaml(path) == {
        "base": {"x": 1},
        "other": {"x": 1, "y": 2},
        "list": [{"x": 1}, {"x": 1}],
    }


def test_recursive_deep_and_unconstructible_yaml_is_bad_input(tmp_path: Path) -> None:
    cases = {
        "a: &x [1, *x]\n": "a recursive YAML structure",
        "a: " + "[" * 100 + "\n": "values nest more than 64 deep",
        # libyaml's scanner stops first, at its own 1000 levels: bad input all the same
        "a: " + "[" * 100_000 + "\n": "nest",
        "a: 2026-13-45\n": "cannot construct: month must be in 1..12",
        "a: !!python/object:os.system {}\n": "could not determine a constructor",
        "a: [\n": "is not valid YAML",
    }
    for text, message in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            bounded.read_yaml(path)


def test_a_config_alias_bomb_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("schema: 1\nname: x\n" + BOMB + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problem = info.value.problems[0]
    assert problem.line == 8 and "100000-node cap ($CHAINPROOF_MAX_YAML_NODES)" in problem.message
    assert info.value.exit_code == 2


def test_an_unreadable_config_value_is_a_problem_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("schema: 1\nname: x\nwhen: 2026-13-45\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(
        p.line == 3 and p.key == "when" and "month must be in 1..12" in p.message
        for p in info.value.problems
    )


def test_an_oversized_config_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("schema: 1\n")
    with open(path, "ab") as fh:
        fh.truncate(64 * MIB)
    with pytest.raises(ConfigError, match=r"more than the 1048576-byte cap \(\$CHAINPROOF_MAX"):
        load_config(path)


# --------------------------------------------------------------------------- run.json


def _record(run: Path, **changes: object) -> None:
    run.mkdir(exist_ok=True)
    record = {
        "run_id": "r1",
        "pipeline": "digits",
        "links": "../../attestations/runs/r1",
        "layout": "../../attestations/runs/r1/root.layout",
        "stages": ["source"],
        "status": "succeeded",
        "release": None,
    }
    record.update(changes)
    (run / "run.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("links", 7, "field 'links' is a number, expected text"),
        ("stages", "source", "field 'stages' is text, expected list of text"),
        ("stages", [1, 2], "field 'stages' is a list holding non-text, expected list of text"),
        ("status", None, "field 'status' is null, expected text"),
        ("release", ["x"], "field 'release' is a list, expected text or null"),
        ("code", "abc", "field 'code' is text, expected object"),
    ],
)
def test_a_run_record_field_of_the_wrong_type_is_bad_input_naming_it(
    tmp_path: Path, field: str, value: object, said: str
) -> None:
    _record(tmp_path / "r1", **{field: value})
    with pytest.raises(InputError) as info:
        read_run_record(tmp_path / "r1")
    assert said in info.value.message and info.value.exit_code == 2


def test_a_good_run_record_reads_and_a_deep_one_is_refused(tmp_path: Path) -> None:
    _record(tmp_path / "r1")
    assert read_run_record(tmp_path / "r1")["stages"] == ["source"]
    (tmp_path / "r1" / "run.json").write_bytes(DEEP)
    with pytest.raises(bounded.LimitExceeded, match=r"run record .*run\.json nests values"):
        read_run_record(tmp_path / "r1")


# --------------------------------------------------------------------------- Statements, keys


def test_a_hostile_statement_is_a_verification_error_naming_it(
    tmp_path: Path, signer: CryptoSigner
) -> None:
    from pipeline.provenance.keys import PublicKey

    path = tmp_path / "dependencies.intoto.json"
    write_signed_statement(path, statement({"a": "0" * 64}, "https://x", {}), signer)
    keys = [PublicKey(signer.public_key)]
    assert read_verified_statement(path, keys)["predicateType"] == "https://x"
    envelope = json.loads(path.read_text())
    for content in (
        DEEP,
        b"[]",
        b'{"payload": "!!", "payloadType": "x", "signatures": []}',
        json.dumps({**envelope, "signatures": ["x"]}).encode(),
        json.dumps({**envelope, "payload": base64.b64encode(DEEP).decode()}).encode(),
    ):
        path.write_bytes(content)
        with pytest.raises(VerificationError) as info:
            read_verified_statement(path, keys)
        assert info.value.check == "attestations" and info.value.artifact == str(path)
        # the display-only reader: a statement, or unreadable, never another exception
        with contextlib.suppress(ValueError, KeyError, TypeError):
            assert isinstance(payload_of(path), dict)


def test_a_hostile_key_file_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "owner.pub"
    for content in (
        DEEP,
        b"[]",
        b'"text"',
        b'{"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": 1.5}}',
        b'{"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": "ab"}, "keyid": 7}',
    ):
        path.write_bytes(content)
        with pytest.raises(InputError):
            load_public_key(path)
    with open(path, "ab") as fh:
        fh.truncate(10 * MIB)
    with pytest.raises(bounded.LimitExceeded, match=r"public key .* more than the 65536-byte"):
        load_public_key(path)


# --------------------------------------------------------------------------- OpenSSF signature


def test_an_altered_openssf_signature_is_a_verification_error(tmp_path: Path) -> None:
    from pipeline.provenance.keys import RELEASE_KEY, RELEASE_PUB, init_release_key
    from pipeline.provenance.openssf import sign_model_dir, verify_model_dir

    model, sig, keys = tmp_path / "model", tmp_path / "model.sig", tmp_path / "keys"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"weights")
    init_release_key(keys)
    sign_model_dir(model, sig, keys / RELEASE_KEY)
    verify_model_dir(model, sig, keys / RELEASE_PUB)
    bundle = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[len(raw) // 2] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(VerificationError, match="does not verify with the release key") as info:
        verify_model_dir(model, sig, keys / RELEASE_PUB)
    assert info.value.check == "model signature" and info.value.artifact == str(sig)
    bundle["dsseEnvelope"]["signatures"] = []
    for content in (json.dumps(bundle).encode(), b"[]", DEEP, b""):
        sig.write_bytes(content)
        with pytest.raises(VerificationError):
            verify_model_dir(model, sig, keys / RELEASE_PUB)


# --------------------------------------------------------------------------- source data


def test_source_data_that_is_unsafe_or_corrupt_is_a_stage_error_naming_it(
    tmp_path: Path,
) -> None:
    from pipeline.stage import StageError
    from stages.source import _load_file

    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    assert _load_file(good)[0].shape == (4, 3)
    obj = tmp_path / "object.npz"
    np.savez(obj, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    data = good.read_bytes()
    cases = {
        obj: "Object arrays cannot be loaded",
        tmp_path / "cut.npz": "not a readable .npz",
        tmp_path / "flipped.npz": "not a readable .npz",
        tmp_path / "text.npz": "not a readable .npz",
        tmp_path / "words.csv": "is not a numeric CSV",
        tmp_path / "ragged.csv": "is not a numeric CSV",
    }
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "text.npz").write_bytes(b"not a zip")
    (tmp_path / "words.csv").write_text("1,2,x\n3,4,1\n")
    (tmp_path / "ragged.csv").write_text("1,2,0\n3,4\n")
    for path, message in cases.items():
        with pytest.raises(StageError) as info:
            _load_file(path)
        assert str(path) in info.value.message and message in info.value.message


def test_every_bounded_error_is_a_chainproof_error_of_exit_2() -> None:
    for exc in (bounded.LimitExceeded, bounded.RecursiveYAML):
        assert issubclass(exc, InputError) and issubclass(exc, Error)
        assert exc.exit_code == 2


def test_lineage_sync_refuses_a_run_whose_config_copy_is_an_alias_bomb(tmp_path: Path) -> None:
    from pipeline.lineage import sync_run_dir

    run = tmp_path / "runs" / "r1"
    run.parent.mkdir()
    _record(run)
    (run / "config.yaml").write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(bounded.LimitExceeded, match=r"run's config copy .*100000-node cap"):
        sync_run_dir(run)
    assert time.perf_counter() - t0 < 5
    (run / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="is not a mapping"):
        sync_run_dir(run)


@pytest.mark.parametrize("composer", ["libyaml events", "pure python"])
def test_both_yaml_event_parsers_hold_the_same_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, composer: str
) -> None:
    if composer == "pure python":
        from pipeline import bounded_yaml

        monkeypatch.setattr(bounded_yaml, "_Composed", bounded_yaml._PureComposer)
    cases = {
        BOMB: "aliases expand this document past the 100000-node cap",
        "a: &x [1, *x]\n": "a recursive YAML structure",
        "a: " + "[" * 100 + "\n": "values nest more than 64 deep",
        "a: " + "[" * 100_000 + "\n": "nest",
        "- x\n" * 100_001: "the document holds more than the 100000-node cap",
    }
    for text, message in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=message):
            bounded.read_yaml(path)
        assert composer == "pure python" or time.perf_counter() - t0 < 10
    path.write_text("a:\n  b: [1, 2]\nc: &c {d: 1}\ne: *c\n")
    node = bounded.compose_yaml(path.read_text(), source="c")
    assert node is not None and node.value[0][1].value[0][1].start_mark.line == 1
    assert bounded.read_yaml(path) == {"a": {"b": [1, 2]}, "c": {"d": 1}, "e": {"d": 1}}
