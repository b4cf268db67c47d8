"""Per-worker system metrics: while a distributed stage trains, the runner samples each worker's
process tree with psutil, from outside its sandbox (a worker cannot forge its own figures), and
writes them under MLflow's system-metric names for the lineage to log as `system/<node>/<name>`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_write_text
from pipeline.provenance.workers import METRICS_KEY

INTERVAL_SECONDS = 1.0
# Memory stays bounded however long a stage trains: past this many samples every second one
# is dropped and the interval doubles (a long run keeps an even, coarser series).
MAX_SAMPLES = 2048
MAX_PROCESSES = 256  # per worker and sample: a fork bomb cannot stall the supervision loop
# The names MLflow's own monitors use, where the meaning is the same: the CPU as a share of the
# whole machine (0-100) and memory in MB (1e6 bytes) - here of the worker's processes only.
CPU = "cpu_utilization_percentage"
RSS = "process_memory_rss_megabytes"
THREADS = "process_threads"
METRICS = (CPU, RSS, THREADS)
SCHEMA = 1
MAX_WORKERS = 1024
MAX_LOGGED = 100_000  # metric values one run logs to MLflow at most (100 batches)
RECORD_KEY = METRICS_KEY  # the worker record's key for its file: {path, sha256}


def node_id(index: int) -> str:
    """The node id a worker's metrics carry (MLflow: `system/<node_id>/<metric>`)."""
    return f"worker-{index}"


@dataclass
class TreeSampler:
    """One worker: its root process (bubblewrap, or the command itself) and every descendant."""

    pid: int
    # CPU seconds seen so far, per process (pid, create_time), so a reused pid is not mixed up
    _cpu: dict[tuple[int, float], float] = field(default_factory=dict)
    _last: float | None = None
    _born: float | None = None  # the root's create time: a reused pid is another process
    gone: bool = False

    def sample(self, now: float) -> dict[str, float] | None:
        """CPU share since the last sample, resident memory and threads; None once gone.

        A process's CPU includes its reaped children's (children_user/system), so work done in
        short-lived children between two samples is counted, not hidden."""
        import psutil

        if self.gone:
            return None
        try:
            root = psutil.Process(self.pid)
            born = root.create_time()
            if self._born is None:
                self._born = born
            elif born != self._born:
                raise psutil.NoSuchProcess(self.pid)
            procs = [root, *root.children(recursive=True)[:MAX_PROCESSES]]
        except psutil.Error:
            self.gone = True
            return None
        cpu = rss = 0.0
        threads = 0
        seen: dict[tuple[int, float], float] = {}
        for p in procs:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    total = t.user + t.system + t.children_user + t.children_system
                    mem = p.memory_info().rss
                    n = p.num_threads()
            except psutil.Error:  # exited between the listing and the read
                continue
            seen[key] = total
            cpu += total - self._cpu.get(key, total if self._last is None else 0.0)
            rss += mem
            threads += n
        self._cpu = seen
        last, self._last = self._last, now
        if last is None or now <= last:
            share = 0.0
        else:
            share = 100.0 * max(cpu, 0.0) / ((now - last) * (os.cpu_count() or 1))
        return {CPU: round(min(share, 100.0), 2), RSS: round(rss / 1e6, 2), THREADS: threads}


@dataclass
class Recorder:
    """Samples every worker at most once per interval; `tick` is called from the runner's
    supervision loop, so no thread is needed and sampling stops with the workers."""

    pids: dict[int, int]  # worker index -> root pid
    interval: float = INTERVAL_SECONDS
    series: dict[int, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)
    _samplers: dict[int, TreeSampler] = field(default_factory=dict)
    _next: float = 0.0
    available: bool = True

    def __post_init__(self) -> None:
        try:
            import psutil  # noqa: F401  (in the lock; an environment without it records none)
        except ImportError:
            self.available = False
        self._samplers = {i: TreeSampler(pid) for i, pid in self.pids.items()}
        self.series = {i: [] for i in self.pids}

    def tick(self) -> None:
        now = time.monotonic()
        if not self.available or now < self._next:
            return
        self._next = now + self.interval
        stamp = int(time.time() * 1000)
        for i, sampler in self._samplers.items():
            values = sampler.sample(now)
            if values is None:
                continue
            series = self.series[i]
            series.append((stamp, values))
            if len(series) > MAX_SAMPLES:
                del series[1::2]
                self.interval *= 2

    def write(self, path_for: dict[int, Path]) -> dict[int, Path]:
        """One JSON file per worker that has samples; returns {index: file}."""
        written: dict[int, Path] = {}
        if not self.available:
            return written
        for i, series in self.series.items():
            if not series or i not in path_for:
                continue
            doc = {
                "schema": SCHEMA,
                "node_id": node_id(i),
                "interval_seconds": self.interval,
                "samples": [{"timestamp_ms": ts, **values} for ts, values in series],
            }
            # never through a symlink someone placed there: a new file, renamed over
            atomic_write_text(path_for[i], json.dumps(doc, sort_keys=True) + "\n")
            written[i] = path_for[i]
        return written


MAX_FILE_BYTES = 8 * 1024 * 1024


def read_samples(path: Path) -> list[tuple[int, int, dict[str, float]]]:
    """(step, timestamp_ms, {metric: value}) from a recorder's file, read as hostile data:
    bounded, every field type-checked, unknown metrics dropped."""
    from pipeline import bounded

    doc: Any = bounded.read_json(path, what="system metrics", max_bytes=MAX_FILE_BYTES)
    samples = doc.get("samples") if isinstance(doc, dict) else None
    if not isinstance(samples, list):
        return []
    out = []
    for step, s in enumerate(samples[: MAX_SAMPLES + 1]):
        stamp = s.get("timestamp_ms") if isinstance(s, dict) else None
        if not isinstance(stamp, int) or isinstance(stamp, bool) or not 0 <= stamp < 2**63:
            continue
        values = {k: float(v) for k in METRICS if _plausible(v := s.get(k))}
        if values:
            out.append((step, stamp, values))
    return out


def _plausible(v: Any) -> bool:
    """A number a sample can hold: compared before any float() (a 400-digit int overflows)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return -1e12 < v < 1e12 and (isinstance(v, int) or math.isfinite(v))
