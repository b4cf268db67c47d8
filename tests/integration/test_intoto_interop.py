"""in-toto-verify 3.1, the locked one, alone judges a real run: it passes, and a flipped
weights byte fails it, through the layout's inspection and the owner key `keys export --pem`
writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import chainproof

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

IN_TOTO_VERIFY = Path(sys.executable).parent / "in-toto-verify"


def _in_toto_verify(ws: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """As the README says: export the owner key, then run in-toto-verify from inside the run."""
    if not IN_TOTO_VERIFY.is_file():
        pytest.skip(f"{IN_TOTO_VERIFY} is not installed (it comes with the locked in-toto)")
    pem = tmp_path / "owner.pem.pub"
    proc = chainproof("keys", "export", "owner", "--pem", "-o", pem, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    run = (ws / "runs" / "latest").resolve()
    links = ws / "attestations" / "runs" / run.name
    return subprocess.run(
        [
            # the script under this interpreter: a copied venv's shebang may name another one
            sys.executable,
            str(IN_TOTO_VERIFY),
            "--layout",
            str(links / "root.layout"),
            "--verification-keys",
            str(pem),
            "--link-dir",
            str(links),
        ],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_in_toto_verify_passes_a_real_run(workspace_copy, tmp_path):
    proc = _in_toto_verify(workspace_copy, tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # the inspection link in-toto-verify leaves in the run does not upset chainproof's verifier
    again = chainproof("verify", workspace_copy / "runs" / "latest", "--workspace", workspace_copy)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "inspections" in again.stdout


def test_in_toto_verify_alone_fails_a_flipped_weights_byte(workspace_copy, tmp_path):
    weights = (workspace_copy / "runs" / "latest").resolve() / "train" / "model.keras"
    data = bytearray(weights.read_bytes())
    data[2000] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = _in_toto_verify(workspace_copy, tmp_path)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "RuleVerificationError" in proc.stderr
    assert "train/model.keras" in proc.stderr
