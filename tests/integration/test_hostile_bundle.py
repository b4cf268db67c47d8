"""A real release bundle with hostile files in it: `chainproof verify` exits 1 naming the check
and the file — an altered OpenSSF signature, a deep or padded link, a deep signed Statement —
never exit 70, and never by reading a padded file whole."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import chainproof

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

MIB = 1024 * 1024


@pytest.fixture
def bundle(completed_workspace: Path, tmp_path: Path) -> tuple[Path, str]:
    """The release bundle alone, copied away from its workspace, and the owner's fingerprint."""
    (found,) = [
        p
        for p in (completed_workspace / "releases" / "digits-fast").iterdir()
        if not p.is_symlink()
    ]
    dest = tmp_path / "release"
    shutil.copytree(found, dest)
    keyid = json.loads((completed_workspace / "attestations/keys/owner.pub").read_text())["keyid"]
    return dest, keyid


def _verify(bundle: Path, fp: str) -> tuple[int, str]:
    proc = chainproof("verify", bundle, "--owner-key", fp, timeout=300)
    assert "internal error" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def test_an_altered_openssf_signature_is_a_verification_failure(bundle: tuple[Path, str]) -> None:
    root, fp = bundle
    sig = root / "attestations" / "model.sig"
    doc = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[len(raw) // 2] ^= 1
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(doc))
    code, err = _verify(root, fp)
    assert code == 1, err
    assert "check:    model signature" in err and "does not verify with the release key" in err


@pytest.mark.parametrize("how", ["deep", "padded"])
def test_a_hostile_link_in_a_bundle_is_refused_naming_the_cap(
    bundle: tuple[Path, str], how: str
) -> None:
    root, fp = bundle
    link = sorted((root / "attestations").glob("train.*.link"))[0]
    if how == "deep":
        link.write_bytes(b"[" * 100_000 + b"]" * 100_000)
        said = "nests values more than 64 deep"
    else:
        with open(link, "ab") as fh:
            fh.truncate(512 * MIB)
        said = f"is {512 * MIB} bytes, more than the {16 * MIB}-byte cap"
    code, err = _verify(root, fp)
    assert code == 1 and "check:    link format" in err and said in err, err


def test_a_deep_or_altered_signed_statement_is_refused(bundle: tuple[Path, str]) -> None:
    root, fp = bundle
    path = root / "attestations" / "checks" / "dependencies.intoto.json"
    original = path.read_text()
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    code, err = _verify(root, fp)
    assert code == 1 and "check:    attestations" in err, err
    assert "nests values more than 64 deep" in err and str(path) in err
    doc = json.loads(original)  # a deep payload: its signature fails before it is parsed
    doc["payload"] = base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    path.write_text(json.dumps(doc))
    code, err = _verify(root, fp)
    assert code == 1 and "does not verify with the functionary key" in err, err
