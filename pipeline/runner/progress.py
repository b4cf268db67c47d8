"""Progress a stage reports while it runs (epochs), read back by the runner for the terminal.

A stage prints one line `chainproof-progress: {json}` to its stdout per event
(`StageContext.progress`); the
runner tails the stage's stdout log while it waits and hands each well-formed event to a
callback. The log keeps every line, so the link's stdout digest covers them. Everything on
that stream is the stage's, hence hostile: lines are capped, fields are checked, and a line
that is not a well-formed event is ignored (it stays in the log).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stage import PROGRESS_PREFIX as PREFIX

MAX_LINE = 4096  # an event is a few hundred bytes; longer lines are not events
MAX_METRICS = 16
MAX_READ = 1 << 20  # per poll: a stage flooding its stdout cannot stall the runner


@dataclass(frozen=True)
class ProgressEvent:
    """One epoch done: `epoch` of `epochs` (1-based), with that epoch's metrics."""

    stage: str
    epoch: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"[{self.stage}] epoch {self.epoch}/{self.epochs}" + (f"  {shown}" if shown else "")


def parse(stage: str, line: str) -> ProgressEvent | None:
    """The event on one stdout line, or None for anything else (including a malformed one)."""
    if not line.startswith(PREFIX) or len(line) > MAX_LINE:
        return None
    try:
        data: Any = json.loads(line[len(PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    epoch, epochs, metrics = data.get("epoch"), data.get("epochs"), data.get("metrics", {})
    if not (isinstance(epoch, int) and isinstance(epochs, int) and 0 < epoch <= epochs):
        return None
    if isinstance(epoch, bool) or isinstance(epochs, bool) or not isinstance(metrics, dict):
        return None
    clean: dict[str, float] = {}
    for key, value in list(metrics.items())[:MAX_METRICS]:
        if (
            isinstance(key, str)
            and key.isidentifier()
            and len(key) <= 40
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and _finite(value)
        ):
            clean[key] = float(value)
    return ProgressEvent(stage, epoch, epochs, clean)


def _finite(value: int | float) -> bool:
    """A finite number a float can hold (a 400-digit integer overflows float())."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class StdoutTail:
    """Reads the new lines of a stage's stdout log on each call; events go to `on_event`."""

    def __init__(self, stage: str, path: Path, on_event: Callable[[ProgressEvent], None]) -> None:
        self.stage, self.path, self.on_event = stage, path, on_event
        self.offset = 0
        self.partial = b""

    def __call__(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(MAX_READ)
        except OSError:
            return  # not created yet, or gone: nothing to show
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:  # a line without end is not an event
            self.partial = b""
        for raw in lines:
            event = parse(self.stage, raw.decode("utf-8", "replace").rstrip("\r"))
            if event is not None:
                self.on_event(event)


def held_out_metrics(run_dir: Path, stages: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(file, its `test` block) from the last stage whose metrics.json holds held-out
    metrics (the train stage's, or a later stage's copy), or None."""
    from pipeline import bounded
    from pipeline.errors import InputError

    for stage in reversed(stages):
        path = run_dir / stage / "metrics.json"
        if not path.is_file():
            continue
        try:
            data = bounded.read_json(path, what="metrics")
        except (InputError, OSError):
            continue
        test = data.get("test") if isinstance(data, dict) else None
        if isinstance(test, dict) and isinstance(test.get("accuracy"), int | float):
            return f"{stage}/metrics.json", test
    return None
