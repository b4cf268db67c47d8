"""Model scanner bench: chainproof's scanner vs modelaudit, modelscan and picklescan, same samples.

Builds every sample itself (tests/model_samples.py: malicious pickles, PyTorch zips old and new,
joblib raw and compressed, object .npy, Keras Lambda/custom-module/get_file models, a
file-writing SavedModel, HDF5 user-block and prepended-zip polyglots, ONNX custom ops and
escaping external data, GGUF chat-template code, zip bombs, tar members, and clean twins in
every format including a model repository), plus large clean files for throughput, then reports
side by side what each tool catches, false alarms on clean models, and scan time per MB.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/bench_modelscan.py [--no-tf] [--big-mb 64]

Every outside scanner runs from its own throwaway venv (never the project's):

    python3 -m venv /tmp/cmp-modelaudit && /tmp/cmp-modelaudit/bin/pip install \
        'modelaudit[h5,onnx,safetensors,joblib]'
    python3 -m venv /tmp/cmp-modelscan && /tmp/cmp-modelscan/bin/pip install 'modelscan[h5py]'
    python3 -m venv /tmp/cmp-picklescan && /tmp/cmp-picklescan/bin/pip install picklescan

(or point MODELAUDIT_BIN / MODELSCAN_BIN / PICKLESCAN_BIN at their CLIs). A scanner that is not
installed is skipped with that reason. Exits 1 if another scanner catches a sample we miss, or
if the sentinel a payload would create appears.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `pipeline` and `tests` importable

from pipeline.scan.model import Severity, scan_path  # noqa: E402
from tests import model_samples as ms  # noqa: E402

OUT = ROOT / "bench" / "out" / "modelscan"
MIB = 1 << 20
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # modelaudit reports usage to PostHog unless told not to; the bench runs offline.
    "PROMPTFOO_DISABLE_TELEMETRY": "1",
    "NO_ANALYTICS": "1",
}


@dataclass
class Verdict:
    verdict: str  # worst severity that counts as "flagged", "-", "not scanned" or "error"
    seconds: float
    note: str = ""


@dataclass
class Row:
    sample: str
    malicious: bool
    size: int
    ours: str  # worst severity at/above medium, or "-"
    ours_s: float
    theirs: dict[str, Verdict] = field(default_factory=dict)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run_ours(path: Path, repeat: int = 3) -> tuple[str, float]:
    best = float("inf")
    report = None
    for _ in range(repeat):
        report = scan_path(path)
        best = min(best, report.duration_s)
    assert report is not None
    bad = report.at_or_above(Severity.MEDIUM)
    worst = max((f.severity for f in bad), default=None)
    return (worst.label if worst is not None else "-"), best


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, **QUIET_ENV},
        timeout=600,
        check=False,  # every scanner exits non-zero when it finds something
    )
    return done, time.perf_counter() - started


def run_modelscan(binary: Path, path: Path) -> Verdict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _, elapsed = _run([str(binary), "-p", str(path), "-r", "json", "-o", str(report)])
        if not report.exists():
            return Verdict("error", elapsed, "no report written")
        doc = json.loads(report.read_text())
    issues = doc.get("issues") or []
    errors = "; ".join(e.get("description", "") for e in doc.get("errors") or [])
    if issues:
        order = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
        worst = max((i.get("severity", "LOW") for i in issues), key=order.index)
        return Verdict(worst.lower(), elapsed, errors)
    if errors:
        return Verdict("error", elapsed, errors)
    scanned = (doc.get("summary", {}).get("scanned") or {}).get("total_scanned", 0)
    return Verdict("-" if scanned else "not scanned", elapsed, errors)


def run_modelaudit(binary: Path, path: Path) -> Verdict:
    """modelaudit's worst issue; warning and critical count as flagged (its own exit 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done, elapsed = _run(
            [
                str(binary),
                "scan",
                str(path),
                "--format",
                "json",
                "--no-cache",
                "-q",
                "-o",
                str(report),
            ]
        )
        if not report.exists():
            return Verdict("error", elapsed, done.stderr.strip()[-200:])
        doc = json.loads(report.read_text())
    order = ["debug", "info", "warning", "critical"]
    severities = [str(i.get("severity", "info")).lower() for i in doc.get("issues") or []]
    flagged = [s for s in severities if s in ("warning", "critical")]
    if flagged:
        return Verdict(max(flagged, key=order.index), elapsed)
    if doc.get("has_errors"):
        return Verdict("error", elapsed, "scan errors, no warning or critical issue")
    return Verdict("-" if doc.get("files_scanned") else "not scanned", elapsed)


def run_picklescan(binary: Path, path: Path) -> Verdict:
    """picklescan exits 1 on dangerous globals; it only reads pickles (and zips of them)."""
    done, elapsed = _run([str(binary), "-p", str(path)])
    if done.returncode == 1:
        return Verdict("dangerous", elapsed)
    if done.returncode != 0:
        return Verdict("error", elapsed, (done.stderr or done.stdout).strip()[-200:])
    scanned = "Scanned files: 0" not in done.stdout
    return Verdict("-" if scanned else "not scanned", elapsed)


@dataclass(frozen=True)
class External:
    name: str
    binary: Path
    run: Callable[[Path, Path], Verdict]
    install: str


EXTERNALS = [
    External(
        "modelaudit",
        Path(os.environ.get("MODELAUDIT_BIN", "/tmp/cmp-modelaudit/bin/modelaudit")),
        run_modelaudit,
        "python3 -m venv /tmp/cmp-modelaudit && /tmp/cmp-modelaudit/bin/pip install "
        "'modelaudit[h5,onnx,safetensors,joblib]'",
    ),
    External(
        "modelscan",
        Path(os.environ.get("MODELSCAN_BIN", "/tmp/cmp-modelscan/bin/modelscan")),
        run_modelscan,
        "python3 -m venv /tmp/cmp-modelscan && /tmp/cmp-modelscan/bin/pip install "
        "'modelscan[h5py]'",
    ),
    External(
        "picklescan",
        Path(os.environ.get("PICKLESCAN_BIN", "/tmp/cmp-picklescan/bin/picklescan")),
        run_picklescan,
        "python3 -m venv /tmp/cmp-picklescan && /tmp/cmp-picklescan/bin/pip install picklescan",
    ),
]


def startup(tool: External, scratch: Path) -> float:
    """Wall time of a scanner on an empty directory: interpreter + imports."""
    empty = scratch / "empty"
    empty.mkdir(exist_ok=True)
    return min(tool.run(tool.binary, empty).seconds for _ in range(2))


def ours_startup() -> float:
    """Wall time of our command on an empty directory in a fresh interpreter."""
    code = "import sys; from pipeline.scan.model import scan_path; scan_path(sys.argv[1])"
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, tmp], check=True, cwd=ROOT)
        return time.perf_counter() - started


def big_samples(dest: Path, mb: int, with_tf: bool) -> list[ms.Sample]:
    """Large clean files, so MB/s measures scanning rather than start-up."""
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    n = mb * MIB // 4
    arr = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    (dest / "big.npy").write_bytes(b"")
    np.save(dest / "big.npy", arr)
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    with open(dest / "big.safetensors", "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.write(arr.tobytes())
    pkl = dest / "big.pkl"
    import pickle

    pkl.write_bytes(pickle.dumps({"w": arr}, protocol=4))
    samples = [
        ms.Sample(f"big {mb} MiB .npy", dest / "big.npy", False),
        ms.Sample(f"big {mb} MiB .safetensors", dest / "big.safetensors", False),
        ms.Sample(f"big {mb} MiB .pkl (numpy)", pkl, False),
    ]
    if with_tf:
        import keras

        width = int((mb * MIB / 4 / 2) ** 0.5)  # two width x width Dense kernels ~ mb MiB
        model = ms.build_mlp(keras, width=width)
        model.save(dest / "big_mlp.keras")
        model.save(dest / "big_mlp.h5")
        model.export(dest / "big_mlp_export", verbose=False)
        samples += [
            ms.Sample(f"big MLP .keras (w={width})", dest / "big_mlp.keras", False),
            ms.Sample(f"big MLP .h5 (w={width})", dest / "big_mlp.h5", False),
            ms.Sample(f"big MLP SavedModel (w={width})", dest / "big_mlp_export", False),
        ]
    return samples


def caught(verdict: str | None) -> bool:
    return verdict not in (None, "-", "not scanned", "error", "low", "info")


def render(rows: list[Row], tools: list[str]) -> str:
    head = f"{'sample':<36} {'kind':<5} {'MiB':>7}  {'ours':<9} {'ours ms':>8}"
    for name in tools:
        head += f"  {name:<11} {'s':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.sample[:36]:<36} {'evil' if r.malicious else 'clean':<5} {r.size / MIB:>7.2f}  "
            f"{r.ours:<9} {r.ours_s * 1000:>8.1f}"
        )
        for name in tools:
            v = r.theirs.get(name)
            line += f"  {(v.verdict if v else ''):<11} {(v.seconds if v else 0):>5.1f}"
        lines.append(line)
    return "\n".join(lines)


def summarise(rows: list[Row], tools: list[str], starts: dict[str, float]) -> tuple[str, int]:
    scored = [r for r in rows if not r.sample.startswith("big")]
    evil = [r for r in scored if r.malicious]
    clean = [r for r in scored if not r.malicious]

    def line(name: str, verdicts: list[str | None], clean_verdicts: list[str | None]) -> str:
        hit = sum(caught(v) for v in verdicts)
        alarms = sum(caught(v) for v in clean_verdicts)
        return (
            f"{name:<11} caught {hit}/{len(evil)} malicious; passed "
            f"{len(clean) - alarms}/{len(clean)} clean ({alarms} false alarm(s))"
        )

    lines = [line("ours", [r.ours for r in evil], [r.ours for r in clean])]
    missed = 0
    for name in tools:
        lines.append(line(name, [_of(r, name) for r in evil], [_of(r, name) for r in clean]))
        theirs_only = [r.sample for r in evil if caught(_of(r, name)) and not caught(r.ours)]
        missed += len(theirs_only)
        lines.append(f"{'':<11} caught by {name} and not by ours: {theirs_only or 'none'}")
        alarms = [r.sample for r in clean if caught(_of(r, name))]
        lines.append(f"{'':<11} {name} false alarms: {alarms or 'none'}")
    ours_alarms = [r.sample for r in clean if caught(r.ours)]
    lines.append(f"ours false alarms: {ours_alarms or 'none'}")
    big = [r for r in rows if r.sample.startswith("big")]
    for r in big:
        mbps = r.size / MIB / r.ours_s if r.ours_s else float("inf")
        text = f"throughput {r.sample:<32} ours {mbps:7.0f} MB/s (incl. sha256)"
        for name in tools:
            if name in r.theirs and name in starts:
                text += f" | {name} " + _their_rate(r.size, r.theirs[name], starts[name])
        lines.append(text)
    return "\n".join(lines), missed


def _of(row: Row, tool: str) -> str | None:
    return row.theirs[tool].verdict if tool in row.theirs else None


def _their_rate(size: int, v: Verdict, start: float) -> str:
    """Another scanner's MB/s net of its start-up, when the net time is measurable at all."""
    if v.verdict in ("not scanned", "error"):
        return v.verdict
    net = v.seconds - start
    if net < 0.25:  # start-up varies by ~0.3 s run to run: below that it is noise
        return f"start-up noise (wall {v.seconds:.2f} s)"
    return f"{size / MIB / net:5.0f} MB/s net"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-tf", action="store_true", help="skip the Keras/TensorFlow samples")
    ap.add_argument("--big-mb", type=int, default=64, help="size of the throughput samples")
    ap.add_argument(
        "--only", action="append", default=None, help="outside scanners to run (default: all)"
    )
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    shutil.rmtree(OUT, ignore_errors=True)
    sentinel = OUT / "SENTINEL"
    t0 = time.perf_counter()
    samples = ms.write_pickle_samples(OUT / "pickle", sentinel)
    samples += ms.write_frontier_samples(OUT / "frontier", sentinel)
    if not args.no_tf:
        samples += ms.write_tf_samples(OUT / "tf", sentinel)
    samples += big_samples(OUT / "big", args.big_mb, with_tf=not args.no_tf)
    print(f"built {len(samples)} samples in {time.perf_counter() - t0:.1f} s under {OUT}")

    tools = []
    for tool in EXTERNALS:
        if args.only and tool.name not in args.only:
            continue
        if not tool.binary.exists():
            print(f"skipped {tool.name}: not installed at {tool.binary}. Create it with")
            print(f"  {tool.install}")
            continue
        tools.append(tool)
    starts = {t.name: startup(t, OUT) for t in tools}
    rows = []
    for s in samples:
        verdict, secs = run_ours(s.path)
        row = Row(s.name, s.malicious, _size(s.path), verdict, secs)
        for tool in tools:
            row.theirs[tool.name] = tool.run(tool.binary, s.path)
        rows.append(row)
    names = [t.name for t in tools]
    print(render(rows, names))
    text, missed = summarise(rows, names, starts)
    print(text)
    print(f"start-up: ours {ours_startup():.2f} s (fresh interpreter, empty dir)", end="")
    print("".join(f"; {n} {s:.2f} s" for n, s in starts.items()))
    print(f"sentinel created: {sentinel.exists()}")
    (OUT / "results.json").write_text(
        json.dumps(
            [{**r.__dict__, "theirs": {k: v.__dict__ for k, v in r.theirs.items()}} for r in rows],
            indent=2,
        )
    )
    return 1 if missed or sentinel.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
