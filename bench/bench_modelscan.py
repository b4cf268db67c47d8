"""Model scanner bench: chainproof's scanner vs the `modelscan` CLI on the same samples.

Builds every sample itself (tests/model_samples.py: malicious pickles, PyTorch zip, joblib,
object .npy, Keras Lambda/custom-module models, a file-writing SavedModel, and clean models in
every format), plus large clean files for throughput, then reports side by side what each
tool catches, false positives on clean models, and scan time per MB.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/bench_modelscan.py [--no-tf] [--big-mb 64]

modelscan runs from its own throwaway venv (never the project's). Create it with:

    python3 -m venv /tmp/ms && /tmp/ms/bin/pip install 'modelscan[tensorflow,h5py]'

and point MODELSCAN_BIN (default /tmp/ms/bin/modelscan) at its CLI. Without it the bench
still runs our side and says how to create it. Exits 1 if modelscan catches a sample we miss.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `pipeline` and `tests` importable

from pipeline.scan.model import Severity, scan_path  # noqa: E402
from tests import model_samples as ms  # noqa: E402

OUT = ROOT / "bench" / "out" / "modelscan"
DEFAULT_BIN = Path(os.environ.get("MODELSCAN_BIN", "/tmp/ms/bin/modelscan"))
MIB = 1 << 20


@dataclass
class Row:
    sample: str
    malicious: bool
    size: int
    ours: str  # worst severity at/above medium, or "-"
    ours_s: float
    theirs: str | None = None  # worst modelscan severity, "-", "not scanned" or "error"
    theirs_s: float | None = None
    theirs_note: str = ""  # modelscan's own error text, if any


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


def run_modelscan(binary: Path, path: Path) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        started = time.perf_counter()
        subprocess.run(
            [str(binary), "-p", str(path), "-r", "json", "-o", str(report)],
            capture_output=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            timeout=600,
            check=False,  # modelscan exits 1 when it finds issues
        )
        elapsed = time.perf_counter() - started
        if not report.exists():
            return "error", elapsed, "no report written"
        doc = json.loads(report.read_text())
    issues = doc.get("issues") or []
    errors = "; ".join(e.get("description", "") for e in doc.get("errors") or [])
    if issues:
        order = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
        worst = max((i.get("severity", "LOW") for i in issues), key=order.index)
        return worst.lower(), elapsed, errors
    if errors:
        return "error", elapsed, errors
    scanned = (doc.get("summary", {}).get("scanned") or {}).get("total_scanned", 0)
    return ("-" if scanned else "not scanned"), elapsed, errors


def modelscan_startup(binary: Path, scratch: Path) -> float:
    """Wall time of modelscan on an empty directory: interpreter + imports (TensorFlow)."""
    empty = scratch / "empty"
    empty.mkdir(exist_ok=True)
    return min(run_modelscan(binary, empty)[1] for _ in range(2))


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


def render(rows: list[Row], have_theirs: bool) -> str:
    head = f"{'sample':<34} {'kind':<5} {'MiB':>7}  {'ours':<9} {'ours ms':>8}"
    if have_theirs:
        head += f"  {'modelscan':<11} {'wall s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.sample:<34} {'evil' if r.malicious else 'clean':<5} {r.size / MIB:>7.2f}  "
            f"{r.ours:<9} {r.ours_s * 1000:>8.1f}"
        )
        if have_theirs:
            line += f"  {r.theirs or '':<11} {r.theirs_s or 0:>6.2f}"
        lines.append(line)
    return "\n".join(lines)


def summarise(rows: list[Row], have_theirs: bool, ms_start: float | None) -> tuple[str, int]:
    def caught(verdict: str | None) -> bool:
        return verdict not in (None, "-", "not scanned", "error", "low")

    evil = [r for r in rows if r.malicious]
    clean = [r for r in rows if not r.malicious]
    lines = [
        f"ours:      caught {sum(caught(r.ours) for r in evil)}/{len(evil)} malicious, "
        f"{sum(caught(r.ours) for r in clean)} false positive(s) at >= medium "
        f"on {len(clean)} clean",
    ]
    missed = 0
    if have_theirs:
        lines.append(
            f"modelscan: caught {sum(caught(r.theirs) for r in evil)}/{len(evil)} malicious, "
            f"{sum(caught(r.theirs) for r in clean)} false positive(s) (any issue) "
            f"on {len(clean)} clean"
        )
        theirs_only = [r.sample for r in evil if caught(r.theirs) and not caught(r.ours)]
        ours_only = [r.sample for r in evil if caught(r.ours) and not caught(r.theirs)]
        missed = len(theirs_only)
        lines.append(f"caught by modelscan only: {theirs_only or 'none'}")
        lines.append(f"caught by ours only:      {ours_only or 'none'}")
        for r in rows:
            if r.theirs_note:
                lines.append(f"modelscan error on {r.sample}: {r.theirs_note[:110]}")
    big = [r for r in rows if r.sample.startswith("big")]
    for r in big:
        mbps = r.size / MIB / r.ours_s if r.ours_s else float("inf")
        text = f"throughput {r.sample:<32} ours {mbps:7.0f} MB/s (incl. sha256)"
        if have_theirs and r.theirs_s is not None and ms_start is not None:
            text += " | modelscan " + _their_rate(r, ms_start)
        lines.append(text)
    return "\n".join(lines), missed


def _their_rate(r: Row, start: float) -> str:
    """modelscan's MB/s net of its start-up, when the net time is measurable at all."""
    if r.theirs in ("not scanned", "error"):
        return f"{r.theirs}"
    net = (r.theirs_s or 0) - start
    if net < 0.25:  # start-up varies by ~0.3 s run to run: below that it is noise
        return f"within start-up noise (wall {r.theirs_s:.2f} s)"
    return f"{r.size / MIB / net:7.0f} MB/s (wall minus start-up)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-tf", action="store_true", help="skip the Keras/TensorFlow samples")
    ap.add_argument("--big-mb", type=int, default=64, help="size of the throughput samples")
    ap.add_argument("--modelscan", type=Path, default=DEFAULT_BIN)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    shutil.rmtree(OUT, ignore_errors=True)
    sentinel = OUT / "SENTINEL"
    t0 = time.perf_counter()
    samples = ms.write_pickle_samples(OUT / "pickle", sentinel)
    if not args.no_tf:
        samples += ms.write_tf_samples(OUT / "tf", sentinel)
    samples += big_samples(OUT / "big", args.big_mb, with_tf=not args.no_tf)
    print(f"built {len(samples)} samples in {time.perf_counter() - t0:.1f} s under {OUT}")

    have_theirs = args.modelscan.exists()
    if not have_theirs:
        print(
            f"modelscan not found at {args.modelscan}: comparing nothing. Create it with\n"
            "  python3 -m venv /tmp/ms && /tmp/ms/bin/pip install 'modelscan[tensorflow,h5py]'\n"
            "(or set MODELSCAN_BIN)"
        )
    ms_start = modelscan_startup(args.modelscan, OUT) if have_theirs else None
    rows = []
    for s in samples:
        verdict, secs = run_ours(s.path)
        row = Row(s.name, s.malicious, _size(s.path), verdict, secs)
        if have_theirs:
            row.theirs, row.theirs_s, row.theirs_note = run_modelscan(args.modelscan, s.path)
        rows.append(row)
    print(render(rows, have_theirs))
    text, missed = summarise(rows, have_theirs, ms_start)
    print(text)
    print(f"start-up: ours {ours_startup():.2f} s (fresh interpreter, empty dir)", end="")
    print(f"; modelscan {ms_start:.2f} s" if ms_start is not None else "")
    print(f"sentinel created: {sentinel.exists()}")
    (OUT / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 1 if missed or sentinel.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
