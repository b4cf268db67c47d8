"""The distribution params: what a config may ask for, and how a worker reads its place in
the cluster (TF_CONFIG from the runner, checked against the params). No TensorFlow."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.stage import StageError
from stages.train import Distribution, TrainParams, scores, worker_task


def test_multi_worker_params() -> None:
    p = TrainParams.model_validate(
        {"distribution": {"strategy": "multi_worker_mirrored", "workers": 2}}
    )
    assert p.distribution == Distribution(strategy="multi_worker_mirrored", workers=2)


@pytest.mark.parametrize(
    ("distribution", "message"),
    [
        ({"strategy": "mirrored", "workers": 2}, "mirrored runs in one process"),
        ({"strategy": "parameter_server"}, "Input should be"),
        ({"strategy": "multi_worker_mirrored", "workers": 0}, "greater than or equal to 1"),
        ({"strategy": "multi_worker_mirrored", "workers": 17}, "less than or equal to 16"),
        (
            {"strategy": "multi_worker_mirrored", "workers": 2, "hosts": ["a:1"]},
            "hosts names 1 worker(s) but workers is 2",
        ),
        ({"strategy": "multi_worker_mirrored", "hosts": ["a"]}, "is not host:port"),
        ({"strategy": "multi_worker_mirrored", "hosts": ["a:99999"]}, "is not host:port"),
        (
            {"strategy": "multi_worker_mirrored", "workers": 2, "hosts": ["a:1", "-oX=y:1"]},
            "is not a hostname, IPv4 address or [IPv6] address",
        ),
        (
            {"strategy": "multi_worker_mirrored", "workers": 2, "hosts": ["a:1", "a:1"]},
            "is named twice",
        ),
        ({"strategy": "multi_worker_mirrored", "launcher": ["ssh"]}, "name hosts"),
        (
            {
                "strategy": "multi_worker_mirrored",
                "workers": 2,
                "hosts": ["a:1", "b:1"],
                "remote_checkout": "srv/x; rm -rf ~",
            },
            "must be an absolute path",
        ),  # fmt: skip
    ],
)
def test_refused_distributions(distribution: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        TrainParams.model_validate({"distribution": distribution})


def test_early_stopping_is_refused_with_distribution() -> None:
    with pytest.raises(ValidationError, match="early_stopping is not supported"):
        TrainParams.model_validate(
            {"distribution": {"strategy": "mirrored"}, "early_stopping": {"patience": 1}}
        )


def tf_config(index: object, n: int = 2, kind: str = "worker") -> str:
    workers = [f"127.0.0.1:{23456 + i}" for i in range(n)]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": kind, "index": index}})


def test_worker_reads_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CONFIG", tf_config(1))
    index, cfg = worker_task(Distribution(strategy="multi_worker_mirrored", workers=2))
    assert index == 1 and len(cfg["cluster"]["worker"]) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "needs TF_CONFIG"),
        ("{not json", "not a worker's cluster spec"),
        ('{"cluster": {}}', "not a worker's cluster spec"),
        (tf_config(0, n=3), "names task worker 0 of 3 worker(s); the params say 2"),
        (tf_config(2), "names task worker 2 of 2"),
        (tf_config("0"), "names task worker 0 of 2"),
        (tf_config(0, kind="ps"), "names task ps 0"),
    ],
)
def test_a_cluster_spec_that_disagrees_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(StageError, match=re.escape(message)):
        worker_task(Distribution(strategy="multi_worker_mirrored", workers=2))


def test_scores_are_keras_sparse_crossentropy_and_accuracy() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]], np.float32)
    y = np.array([0, 1, 1])
    loss, accuracy = scores(probs, y)
    expected = -(np.log(0.7) + np.log(0.1) + np.log(1.0)) / 3
    assert loss == pytest.approx(expected, rel=1e-6) and accuracy == pytest.approx(2 / 3)
    assert scores(np.zeros((0, 3)), np.zeros((0,))) == (0.0, 0.0)


def test_a_cluster_with_its_launcher() -> None:
    d = Distribution.model_validate(
        {
            "strategy": "multi_worker_mirrored",
            "workers": 2,
            "hosts": ["train-0.lan:23456", "[fd00::2]:23456"],
            "launcher": ["ssh", "-T", "--", "{host}", "cd /srv/cp && .venv/bin/chainproof worker"],
            "remote_checkout": "/srv/cp",
        }
    )  # fmt: skip
    assert d.hosts == ("train-0.lan:23456", "[fd00::2]:23456") and d.launcher is not None
