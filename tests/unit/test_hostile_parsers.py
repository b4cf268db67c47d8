"""Property tests: the link, layout, Statement, config, run-record and key readers on random and
adversarial bytes. Every input ends in a result or a chainproof Error of exit 1 or 2 — never
another exception (exit 70) — and the process's peak memory stays within a small bound."""

from __future__ import annotations

import base64
import contextlib
import json
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed in this venv")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from in_toto.models.layout import Layout, Step  # noqa: E402
from in_toto.models.metadata import ENVELOPE_PAYLOAD_TYPE  # noqa: E402
from securesystemslib.dsse import Envelope  # noqa: E402
from securesystemslib.signer import CryptoSigner  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import Error  # noqa: E402
from pipeline.provenance.chain import VerifyReport, load_layout, verify_chain  # noqa: E402
from pipeline.provenance.keys import PublicKey, load_public_key  # noqa: E402
from pipeline.provenance.links import envelope_bytes, link_filename, read_link  # noqa: E402
from pipeline.provenance.statements import payload_of, read_verified_statement  # noqa: E402
from pipeline.workspace import read_run_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
MEMORY_BOUND_MIB = 300  # peak RSS growth over a whole property run
SIGNER = CryptoSigner.generate_ed25519()
KEY = PublicKey(SIGNER.public_key)
EXAMPLES = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --------------------------------------------------------------------------- strategies

VOCABULARY = [
    "_type", "name", "materials", "products", "byproducts", "command", "environment", "signed",
    "signatures", "payload", "payloadType", "keyid", "sig", "steps", "keys", "expires", "readme",
    "inspect", "pubkeys", "threshold", "expected_materials", "expected_products",
    "expected_command", "keytype", "scheme", "keyval", "public", "subject", "digest", "sha256",
    "predicateType", "predicate", "run_id", "links", "layout", "stages", "status", "release",
    "return-value",
]  # fmt: skip
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["link", "layout", ENVELOPE_PAYLOAD_TYPE, "ed25519", "MATCH", "*"])
)
json_values = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(VOCABULARY) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=25,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _signed(payload: bytes, payload_type: str = ENVELOPE_PAYLOAD_TYPE) -> bytes:
    env = Envelope(payload=payload, payload_type=payload_type, signatures={})
    env.sign(SIGNER)
    return json.dumps(env.to_dict()).encode()


@st.composite
def metadata_bytes(draw: st.DrawFn) -> bytes:
    """Bytes shaped more or less like in-toto metadata, DSSE Statements or worse."""
    value = draw(json_values)
    text = json.dumps(value).encode()
    depth = draw(st.integers(1, 200_000))
    kind = draw(
        st.sampled_from(
            ["raw", "json", "envelope", "signed", "legacy", "deep", "deep-payload", "truncated"]
        )
    )
    if kind == "raw":
        return draw(st.binary(max_size=400))
    if kind == "json":
        return text
    if kind == "envelope":
        sigs = draw(st.lists(json_values, max_size=3))
        return json.dumps(
            {"payload": _b64(text), "payloadType": ENVELOPE_PAYLOAD_TYPE, "signatures": sigs}
        ).encode()
    if kind == "signed":  # validly signed, so the reader gets past the signature to the payload
        if isinstance(value, dict) and draw(st.booleans()):
            value["_type"] = draw(st.sampled_from(["link", "layout"]))
        return _signed(json.dumps(value).encode())
    if kind == "legacy":
        return json.dumps({"signed": value, "signatures": []}).encode()
    if kind == "deep":
        return b"[" * depth + b"]" * depth
    if kind == "deep-payload":
        return _signed(b'{"_type": "link", "x": ' + b"[" * depth + b"]" * depth + b"}")
    cut = draw(st.integers(0, max(0, len(text) - 1)))
    return text[:cut] + draw(st.binary(max_size=8))


def _write(path: Path, data: bytes, sparse_size: int | None) -> None:
    path.write_bytes(data)
    if sparse_size is not None and sparse_size > len(data):
        with open(path, "ab") as fh:  # huge on paper, nothing on disk
            fh.truncate(sparse_size)


# The record cap is lowered to 1 MiB for these tests (the logic is the same, the reads cheaper):
# files just under it are read and parsed, the rest refused unread.
RECORD_CAP = 1 * MIB
SPARSE = st.none() | st.sampled_from([RECORD_CAP - 1, RECORD_CAP + 1, 512 * MIB, 4096 * MIB])


@pytest.fixture(autouse=True, scope="module")
def _record_cap() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAINPROOF_MAX_RECORD_BYTES", str(RECORD_CAP))
        yield


# --------------------------------------------------------------------------- harness


def _ends_cleanly(read: Callable[[], Any]) -> None:
    """A result, or a chainproof Error whose exit code is 1 or 2. Anything else fails."""
    try:
        read()
    except Error as e:
        assert e.exit_code in (1, 2), f"{type(e).__name__} exit {e.exit_code}: {e}"


@pytest.fixture(autouse=True)
def _memory_bound() -> Iterator[None]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < MEMORY_BOUND_MIB, f"peak memory grew {grown:.0f} MiB"


# --------------------------------------------------------------------------- properties


@EXAMPLES
@given(data=metadata_bytes(), sparse=SPARSE)
def test_read_link_ends_in_a_link_or_bad_input(tmp_path: Path, data: bytes, sparse) -> None:
    path = tmp_path / "source.abcdef12.link"
    _write(path, data, sparse)
    _ends_cleanly(lambda: read_link(path))


@EXAMPLES
@given(data=metadata_bytes(), sparse=SPARSE)
def test_load_layout_ends_in_a_layout_or_a_verification_error(
    tmp_path: Path, data: bytes, sparse
) -> None:
    path = tmp_path / "root.layout"
    _write(path, data, sparse)
    _ends_cleanly(lambda: load_layout(path, KEY, VerifyReport(target="", owner_keyid=KEY.keyid)))


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layout with one step, signed by KEY, which also is that step's functionary."""
    directory = tmp_path_factory.mktemp("chain")
    layout = Layout()
    layout.keys = {KEY.keyid: KEY.legacy_dict()}
    layout.steps = [
        Step(name="source", pubkeys=[KEY.keyid], expected_command=["python"], threshold=1)
    ]
    layout.set_relative_expiration(days=1)
    (directory / "root.layout").write_bytes(envelope_bytes(layout, SIGNER))
    return directory


@EXAMPLES
@given(data=metadata_bytes(), sparse=SPARSE)
def test_verify_chain_on_a_hostile_link_ends_in_a_report_or_a_verification_error(
    chain_dir: Path, data: bytes, sparse
) -> None:
    link = chain_dir / link_filename("source", KEY.keyid)
    _write(link, data, sparse)
    _ends_cleanly(
        lambda: verify_chain(
            layout_path=chain_dir / "root.layout", link_dir=chain_dir, owner=KEY, disk=None
        )
    )


@EXAMPLES
@given(data=metadata_bytes(), sparse=SPARSE, statement=json_values)
def test_statement_readers_end_in_a_statement_or_their_error(
    tmp_path: Path, data: bytes, sparse, statement
) -> None:
    path = tmp_path / "dependencies.intoto.json"
    signed_statement = _signed(json.dumps(statement).encode(), "application/vnd.in-toto+json")
    for content in (data, signed_statement):
        _write(path, content, sparse)
        _ends_cleanly(lambda: read_verified_statement(path, [KEY]))
        # ValueError, KeyError, TypeError: what its display-only callers show as "unreadable"
        with contextlib.suppress(ValueError, KeyError, TypeError):
            payload_of(path)


GOOD_RECORD = {
    "run_id": "r1",
    "pipeline": "digits",
    "links": "../../attestations/runs/r1",
    "layout": "../../attestations/runs/r1/root.layout",
    "stages": ["source", "train"],
    "status": "succeeded",
}


@EXAMPLES
@given(
    data=metadata_bytes(),
    field=st.sampled_from([*GOOD_RECORD, "code", "release", "lineage", "x"]),
    value=json_values,
    sparse=SPARSE,
)
def test_read_run_record_ends_in_a_record_or_bad_input(
    tmp_path: Path, data: bytes, field: str, value, sparse
) -> None:
    run = tmp_path / "r1"
    run.mkdir(exist_ok=True)
    for content in (data, json.dumps({**GOOD_RECORD, field: value}).encode()):
        _write(run / "run.json", content, sparse)
        _ends_cleanly(lambda: read_run_record(run))


@EXAMPLES
@given(data=metadata_bytes(), key=json_values)
def test_load_public_key_ends_in_a_key_or_bad_input(tmp_path: Path, data: bytes, key) -> None:
    path = tmp_path / "owner.pub"
    for content in (data, json.dumps(key).encode()):
        path.write_bytes(content)
        _ends_cleanly(lambda: load_public_key(path))


YAML_LINES = [
    "schema: 1", "name: digits", "lock: ../requirements/main.txt", "stages:",
    "  - name: source", "    kind: source", "    params: {seed: 1}", "  - name: train",
    "    needs: [source]", "a: &x [1, 2, 3]", "b: *x", "c: [*x, *x, *x, *x]", "d: &y [*y]",
    "e: 2026-13-45", "f: !!binary '%%%'", "g: {<<: *x}", "h: 1e400", "i: " + "9" * 5000,
    "? [a, b]", ": c", "j: [[[[", "k: 'unterminated", "\t- tab", "- *x", "l: !!python/name:os",
    "m: " + "[" * 200, "&z n: 1", "o: *undefined", "--- ", "...", "%YAML 1.1", "p: !!set {a}",
    "q: !!omap [a: 1]", "r: 0o777", "s: .inf", "t: ~", "u: \"\\x\"",
]  # fmt: skip
BOMB_LINES = [
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
]
REAL_CONFIG = (ROOT / "configs" / "digits-cnn.yaml").read_text().splitlines()


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["lines", "real", "text", "bomb"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "bomb":
        return "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]", *BOMB_LINES])
    pool = YAML_LINES if kind == "lines" else REAL_CONFIG + YAML_LINES
    if kind == "real":
        lines = list(REAL_CONFIG)
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, draw(st.sampled_from(pool)))
        for _ in range(draw(st.integers(0, 3))):
            if lines:
                lines.pop(draw(st.integers(0, len(lines) - 1)))
        return "\n".join(lines)
    return "\n".join(draw(st.lists(st.sampled_from(pool), max_size=12)))


@EXAMPLES
@given(text=yaml_texts(), raw=st.binary(max_size=200), sparse=SPARSE)
def test_load_config_ends_in_a_config_or_a_config_error(
    tmp_path: Path, text: str, raw: bytes, sparse
) -> None:
    path = tmp_path / "configs" / "pipeline.yaml"
    path.parent.mkdir(exist_ok=True)
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        _write(path, content, sparse)
        _ends_cleanly(lambda: load_config(path))
