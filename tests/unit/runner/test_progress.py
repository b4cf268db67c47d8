"""Epoch progress: what a stage prints is read back as hostile input and streamed live."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli.options import RunProgress
from pipeline.runner import sandbox
from pipeline.runner.progress import (
    MAX_LINE,
    ProgressEvent,
    StdoutTail,
    held_out_metrics,
    parse,
)
from pipeline.stage import PROGRESS_PREFIX, StageContext


def line(**fields: object) -> str:
    return PROGRESS_PREFIX + json.dumps(fields)


def test_a_well_formed_event_is_read_with_its_finite_metrics() -> None:
    ev = parse("train", line(epoch=2, epochs=5, metrics={"loss": 0.5, "accuracy": 0.9}))
    assert ev == ProgressEvent("train", 2, 5, {"loss": 0.5, "accuracy": 0.9})
    assert ev.describe() == "[train] epoch 2/5  loss 0.5000  accuracy 0.9000"


def test_anything_else_a_stage_prints_is_not_an_event() -> None:
    bad = [
        "Epoch 1/5",
        PROGRESS_PREFIX + "{not json",
        PROGRESS_PREFIX + "[1, 2]",
        line(epoch=0, epochs=5),
        line(epoch=6, epochs=5),
        line(epoch=True, epochs=5),
        line(epoch=1.5, epochs=5),
        line(epoch=1, epochs=5, metrics=[1]),
        line(epoch=1, epochs=5, metrics={"x": "y" * MAX_LINE}),
    ]
    assert [parse("train", b) for b in bad] == [None] * len(bad)
    hostile = parse(
        "train",
        line(epoch=1, epochs=2, metrics={"\x1b[2Jx": 1.0, "ok": "1", "nan": float("nan")}),
    )
    assert hostile is not None and hostile.metrics == {}  # no escape, string or NaN shown
    huge = PROGRESS_PREFIX + '{"epoch": 1, "epochs": 2, "metrics": {"loss": 1' + "0" * 400 + "}}"
    assert parse("train", huge) == ProgressEvent("train", 1, 2, {})  # dropped, no OverflowError


def test_the_stage_side_writes_what_the_runner_reads(capsys) -> None:
    ctx = StageContext("r", "train", None, Path("."), {}, ())
    ctx.progress(1, 3, {"loss": 1.25, "val_loss": float("inf")})
    (printed,) = capsys.readouterr().out.splitlines()
    assert parse("train", printed) == ProgressEvent("train", 1, 3, {"loss": 1.25})


def test_the_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    log = tmp_path / "train.stdout"
    seen: list[ProgressEvent] = []
    tail = StdoutTail("train", log, seen.append)
    tail()  # before the file exists
    log.write_text("Epoch 1/2\n" + line(epoch=1, epochs=2)[:20])
    tail()
    assert seen == []
    with log.open("a") as f:
        f.write(line(epoch=1, epochs=2)[20:] + "\n" + line(epoch=2, epochs=2) + "\n")
    tail()
    assert [e.epoch for e in seen] == [1, 2]
    with log.open("a") as f:
        f.write("x" * (MAX_LINE * 3))  # an endless line is dropped, not buffered
    tail()
    assert len(tail.partial) <= MAX_LINE


def test_events_arrive_while_the_stage_runs_not_after(tmp_path: Path) -> None:
    script = (
        "import json, sys, time\n"
        "for i in (1, 2):\n"
        f"    print({PROGRESS_PREFIX!r} + json.dumps({{'epoch': i, 'epochs': 2}}), flush=True)\n"
        "    time.sleep(1.2)\n"
    )
    logs = sandbox.StageLogs(stdout=tmp_path / "out", stderr=tmp_path / "err")
    seen: list[tuple[int, bool]] = []
    marker = tmp_path / "done"

    def watch() -> None:
        for ev in events:
            seen.append((ev.epoch, marker.exists()))
        events.clear()

    events: list[ProgressEvent] = []
    tail = StdoutTail("train", logs.stdout, events.append)
    rc = sandbox.execute(
        [sys.executable, "-c", script + f"open({str(marker)!r}, 'w').close()\n"],
        workdir=tmp_path,
        scratch=tmp_path / "scratch",
        logs=logs,
        timeout=60,
        watch=lambda: (tail(), watch()),
    )
    assert rc == 0
    assert [e for e, _ in seen] == [1, 2]
    assert seen[0] == (1, False)  # shown before the stage finished
    assert logs.stdout.read_text().count(PROGRESS_PREFIX) == 2  # and kept in the log


def test_a_terminal_gets_a_bar_redrawn_in_place_a_pipe_plain_lines() -> None:
    with CliRunner().isolation() as (_, err, _):
        bar = RunProgress(tty=True)
        bar.message("[train] running")
        bar.epoch(ProgressEvent("train", 1, 2, {"loss": 0.5}))
        bar.epoch(ProgressEvent("train", 2, 2, {"loss": 0.25}))
        bar.message("[train] ok")
    text = err.getvalue().decode()
    assert text.count("\r\x1b[K[train] ") == 2 and "epoch 2/2  loss 0.2500\n[train] ok" in text
    assert "█" * 24 in text
    with CliRunner().isolation() as (_, err, _):
        plain = RunProgress(tty=False)
        plain.epoch(ProgressEvent("train", 1, 2, {"loss": 0.5}))
        plain.message("[train] ok")
    assert err.getvalue().decode() == "[train] epoch 1/2  loss 0.5000\n[train] ok\n"


def test_held_out_metrics_come_from_the_last_stage_that_has_them(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(
        json.dumps({"test": {"accuracy": 0.97, "samples": 360}})
    )
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "metrics.json").write_text("[not a mapping]")
    assert held_out_metrics(tmp_path, ["source", "train", "package"]) == (
        "train/metrics.json",
        {"accuracy": 0.97, "samples": 360},
    )
    assert held_out_metrics(tmp_path, ["source"]) is None


def test_library_logging_goes_to_the_workspace_log_not_the_terminal(tmp_path, capsys) -> None:
    import logging

    from pipeline.cli.options import log_third_party

    noisy = logging.getLogger("mlflow.store.db.utils")
    terminal = logging.StreamHandler(sys.stderr)
    logging.getLogger("mlflow").addHandler(terminal)  # as mlflow does when it configures itself
    try:
        first = log_third_party(tmp_path / "a")
        second = log_third_party(tmp_path / "b")  # a later command in the same process
        noisy.info("Creating initial MLflow database tables...")
        assert "Creating initial" not in capsys.readouterr().err
        assert "Creating initial MLflow database tables" in second.read_text()
        assert not first.exists() or "Creating initial" not in first.read_text()
        assert terminal not in logging.getLogger("mlflow").handlers
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_chainproof", False)]:
            root.removeHandler(h)
            h.close()
