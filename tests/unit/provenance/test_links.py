"""Reading a link: the same links accepted and refused as in-toto's own parse, without its
throw-away canonicalisation of the whole link (seconds for a 50k-artifact link)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import attr
import pytest
import securesystemslib.formats
from in_toto.models.link import Link
from in_toto.models.metadata import Metadata
from securesystemslib.signer import CryptoSigner

from pipeline.errors import InputError
from pipeline.provenance.links import load_metadata_payload, write_link

DIGEST = {"sha256": "a" * 64}


def signed_link(tmp_path: Path, **fields: Any) -> Path:
    signer = CryptoSigner.generate_ed25519()
    return write_link(
        tmp_path,
        name=fields.pop("name", "make"),
        materials=fields.pop("materials", {"in.bin": DIGEST}),
        products=fields.pop("products", {f"make/f{i}.bin": DIGEST for i in range(50)}),
        command=fields.pop("command", ["python", "-I", "-m", "stages.make"]),
        byproducts=fields.pop("byproducts", {"return-value": 0}),
        environment=fields.pop("environment", {"run_id": "r1"}),
        signer=signer,
    )


def rewrite_payload(path: Path, payload: bytes) -> Path:
    """The envelope at `path` with another payload (unsigned now: parsing comes first)."""
    env = json.loads(path.read_bytes())
    env["payload"] = base64.b64encode(payload).decode()
    path.write_text(json.dumps(env))
    return path


def in_toto_parse(path: Path) -> Any:
    return Metadata.from_dict(json.loads(path.read_bytes())).get_payload()


def test_a_link_reads_exactly_as_in_toto_reads_it(tmp_path: Path) -> None:
    path = signed_link(tmp_path, environment={"run_id": "r1", "nested": {"a": [1, None, True]}})
    _, ours = load_metadata_payload(path, what="link")
    theirs = in_toto_parse(path)
    assert type(ours) is Link
    assert attr.asdict(ours) == attr.asdict(theirs)
    assert ours.signable_bytes == theirs.signable_bytes  # what a Metablock would sign


def test_upper_case_and_any_algorithm_name_are_accepted_as_in_toto_accepts_them(tmp_path):
    products = {"a": {"sha256": "ABCdef0123"}, "b": {"sha512": "f" * 128, "md5": "0"}}
    path = signed_link(tmp_path, products=products)
    _, link = load_metadata_payload(path, what="link")
    assert link.products == products == in_toto_parse(path).products


def test_reading_a_link_does_not_canonicalise_it(tmp_path: Path, monkeypatch) -> None:
    path = signed_link(tmp_path)

    def refuse(*_a: object, **_k: object) -> str:
        raise AssertionError("the link was canonicalised just to be read")

    monkeypatch.setattr(securesystemslib.formats, "encode_canonical", refuse)
    _, link = load_metadata_payload(path, what="link")
    assert link.products["make/f0.bin"] == DIGEST


@pytest.mark.parametrize(
    "payload",
    [
        # floats: in-toto refuses them only because validation canonicalises the link
        {"environment": {"loss": 0.25}},
        {"byproducts": {"return-value": 1e3}},
        {"environment": {"x": float("nan")}},
        # shapes its validators refuse
        {"materials": ["in.bin"]},
        {"products": {"a": {"sha256": "not hex"}}},
        {"products": {"a": "a" * 64}},
        {"products": {"a": {"sha256": ""}}},
        {"materials": {"a": {"sha256": "ab\n"}}},
        {"materials": {"a": {"sha256": 12}}},
        {"products": {"a": {"sha256": "a" * 64}, "b": None}},
        {"command": "python -I"},
        {"byproducts": []},
        {"environment": "x"},
        {"_type": "layout"},
    ],
)
def test_what_in_toto_refuses_is_refused(tmp_path: Path, payload: dict[str, Any]) -> None:
    path = signed_link(tmp_path)
    data = json.loads(base64.b64decode(json.loads(path.read_bytes())["payload"]))
    data.update(payload)
    rewrite_payload(path, json.dumps(data).encode())
    with pytest.raises(Exception):  # noqa: B017 - whatever in-toto raises for it
        in_toto_parse(path)
    with pytest.raises(InputError, match="link"):
        load_metadata_payload(path, what="link")


def test_a_lone_surrogate_is_refused_as_in_toto_refuses_it(tmp_path: Path) -> None:
    path = signed_link(tmp_path)
    data = json.loads(base64.b64decode(json.loads(path.read_bytes())["payload"]))
    text = json.dumps(data).replace('"r1"', '"\\ud800"')
    rewrite_payload(path, text.encode())
    with pytest.raises(UnicodeEncodeError):
        in_toto_parse(path)
    with pytest.raises(InputError, match="not an in-toto link"):
        load_metadata_payload(path, what="link")


def test_an_escaped_backslash_before_u_d8_is_plain_text(tmp_path: Path) -> None:
    # "\\ud800" in JSON is a backslash then "ud800": no surrogate, the link is fine
    path = signed_link(tmp_path, environment={"run_id": "\\ud800"})
    _, link = load_metadata_payload(path, what="link")
    assert link.environment["run_id"] == "\\ud800"
    assert attr.asdict(link) == attr.asdict(in_toto_parse(path))
