"""A publishing run imports model_signing while a long stage runs, not after the last one."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import sys, threading
from pathlib import Path
from pipeline.provenance import openssf
from pipeline.provenance.keys import RELEASE_KEY, RELEASE_PUB, init_release_key
from pipeline.runner.run import _preload_signing_then

tmp = Path(sys.argv[1])
assert "model_signing" not in sys.modules
import time
from pipeline.runner import run
seen = []
watch = _preload_signing_then(lambda: seen.append("model_signing" in sys.modules))
watch()  # a stage that just started may be a short one: nothing imported yet
run.PRELOAD_AFTER_S = 0.2
time.sleep(0.3)
watch()
watch()  # the stage's own watch still runs every time; the import happened once, first
assert seen == [False, True, True], seen
assert threading.active_count() == 1  # no thread: stages are forked from this process
model = tmp / "model"
model.mkdir()
(model / "weights.bin").write_bytes(b"weights")
init_release_key(tmp / "keys")
openssf.sign_model_dir(model, tmp / "model.sig", tmp / "keys" / RELEASE_KEY)
openssf.verify_model_dir(model, tmp / "model.sig", tmp / "keys" / RELEASE_PUB)
print("signed")
"""


def test_the_stage_watch_preloads_model_signing_once_and_signing_still_verifies(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "signed"
