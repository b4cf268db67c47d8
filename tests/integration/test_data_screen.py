"""The screen stage in a real run: poisoned data stops the run before train; clean data goes
through, and deploy and verify re-check the signed verdict."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.conftest import chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

SCREENED = """
schema: 1
name: digits-screened-test
lock: @MAIN_LOCK@
stages:
  - name: source
    kind: source
    params: {SOURCE}
  - name: screen
    kind: screen
    needs: [source]
    params: {detectors: [labels, backdoor, duplicates, balance]}
  - name: train
    kind: train
    needs: [source, screen]
    params: {epochs: 1, seed: 7}
  - name: package
    kind: package
    needs: [train, screen]
  - name: deploy
    kind: deploy
    needs: [package]
"""


def _badnets_digits(path) -> str:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.copy(), d.target.copy()
    rng = np.random.default_rng(0)
    poison = rng.choice(np.flatnonzero(y != 0), 36, replace=False)  # 20% of class 0
    img = x[poison].reshape(-1, 8, 8)
    img[:, 5:8, 5:8] = 0
    img[:, [5, 6, 7, 5, 7], [5, 6, 7, 7, 5]] = 16
    x[poison] = img.reshape(-1, 64)
    y[poison] = 0
    np.savez(path, x=x, y=y)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_backdoored_dataset_never_reaches_train(tmp_path):
    digest = _badnets_digits(tmp_path / "poisoned.npz")
    source = f"{{path: poisoned.npz, sha256: {digest}, image_shape: [8, 8, 1], scale: 16}}"
    cfg = write_config(tmp_path, SCREENED.replace("{SOURCE}", source))
    proc = chainproof("run", cfg, "--workspace", tmp_path / "ws")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "stage 'screen' failed" in proc.stderr and "backdoor" in proc.stderr
    run = max((tmp_path / "ws" / "runs").glob("2*"))
    assert not (run / "train").exists()


def test_clean_digits_pass_and_verify_rechecks_the_verdict(tmp_path):
    cfg = write_config(tmp_path, SCREENED.replace("{SOURCE}", "{dataset: sklearn-digits}"))
    ws = tmp_path / "ws"
    proc = chainproof("run", cfg, "--workspace", ws)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = (ws / "runs" / "latest").resolve()
    card = json.loads((run / "package" / "model_card.json").read_text())
    assert card["data_screen"]["verdict"] == "pass"
    owner = json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]
    proc = chainproof("verify", run, "--owner-key", owner)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data screened (screen): pass" in proc.stdout, proc.stdout
    (bundle,) = [
        p for p in (ws / "releases" / "digits-screened-test").iterdir() if not p.is_symlink()
    ]
    proc = chainproof("verify", bundle, "--owner-key", owner)
    assert proc.returncode == 0 and "data screened (screen): pass" in proc.stdout, proc.stderr
    # the screened data swapped after the fact: the signed verdict no longer covers it
    (run / "source" / "dataset.npz").write_bytes(b"tampered")
    proc = chainproof("verify", run, "--owner-key", owner)
    assert proc.returncode == 1, proc.stdout
