"""A publishing run imports model_signing while its stages run, not after them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import sys, threading, time
from pathlib import Path
from pipeline.provenance import openssf
from pipeline.provenance.keys import RELEASE_KEY, RELEASE_PUB, init_release_key

tmp = Path(sys.argv[1])
assert "model_signing" not in sys.modules
openssf.warm_up()
openssf.warm_up()  # a second call starts no second import
warming = [t for t in threading.enumerate() if t.name == "import-model-signing"]
assert len(warming) == 1 and warming[0].daemon
# sign at once: the import lock makes this wait for the rest of the background import
model = tmp / "model"
model.mkdir()
(model / "weights.bin").write_bytes(b"weights")
init_release_key(tmp / "keys")
openssf.sign_model_dir(model, tmp / "model.sig", tmp / "keys" / RELEASE_KEY)
openssf.verify_model_dir(model, tmp / "model.sig", tmp / "keys" / RELEASE_PUB)
warming[0].join(timeout=60)
print("signed", "model_signing" in sys.modules)
"""


def test_warm_up_imports_model_signing_in_the_background_and_signing_still_verifies(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "signed True"
