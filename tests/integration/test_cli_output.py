"""What a person sees on the terminal from a real run, and the --json answers programs read."""

from __future__ import annotations

import json

import pytest

from tests.conftest import RUN_OUTPUT, chainproof

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def test_the_run_streams_epochs_and_ends_with_held_out_accuracy(completed_workspace):
    out = (completed_workspace / RUN_OUTPUT / "stdout").read_text().splitlines()
    err = (completed_workspace / RUN_OUTPUT / "stderr").read_text()
    # stderr is a pipe here: one plain line per epoch, between the stage's start and end
    running = err.index("[train] running")
    first, last = err.index("[train] epoch 1/2  "), err.index("[train] epoch 2/2  ")
    assert running < first < last < err.index("[train] ok in")
    assert "val_accuracy" in err[first:last]
    (accuracy,) = [line for line in out if line.startswith("accuracy:")]
    assert "held-out test split" in accuracy and float(accuracy.split()[1]) > 0
    assert out[-1] == "verified: ok" and out.index(accuracy) == len(out) - 2


def test_third_party_noise_is_in_the_log_not_on_the_terminal(completed_workspace):
    err = (completed_workspace / RUN_OUTPUT / "stderr").read_text()
    for noise in ("Creating initial MLflow database tables", "alembic", "cuInit", "absl"):
        assert noise not in err, noise
    log = completed_workspace / ".chainproof" / "logs" / "third-party.log"
    assert "Creating initial MLflow database tables" in log.read_text()


def test_verify_json_lists_every_check_that_passed(completed_workspace):
    proc = chainproof(
        "verify",
        completed_workspace / "runs" / "latest",
        "--workspace",
        completed_workspace,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["verified"] is True and answer["run_id"]
    names = [c["check"] for c in answer["checks"]]
    assert names[0] == "layout signature" and "inspections" in names


def test_show_json_and_reproduce_json(workspace_copy):
    original = (workspace_copy / "runs" / "latest").resolve()
    shown = chainproof("show", original, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["stages"]
    proc = chainproof("reproduce", original, "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    answer = json.loads(proc.stdout)
    assert answer["identical"] is True and answer["original"] == original.name
    train = next(s for s in answer["stages"] if s["stage"] == "train")
    assert {"name": "train/model.keras", "identical": True, "detail": ""} in train["files"]
    assert answer["statement"].endswith(".intoto.json")
