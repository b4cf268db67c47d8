"""Data-screening bench: poisoned and mislabelled digits, our screen against ART and cleanlab.

Cases on scikit-learn's digits (train split 80%, poison only there): BadNets patch triggers
at 5%, 10% and 33% of the target class, a blended trigger (alpha 0.2) at 10%, random label
flips (5% of rows), targeted flips (20% of class 1 relabelled 7), and clean controls, over
several seeds. Per case and method: TPR and FPR overall and within the target class, ROC-AUC
of the raw scores, and for the triggers the attack success rate of an MLP trained on the data
before and after removing the flagged rows. Anchors: cleanlab alone (our `labels` detector
is exactly cleanlab on 5-fold logistic-regression probabilities), and IBM ART's
ActivationDefence and SpectralSignatureDefense, run from a throwaway venv:

    python3 -m venv /tmp/art-venv && /tmp/art-venv/bin/pip install \
        adversarial-robustness-toolbox scikit-learn packaging

(or ART_PYTHON=/path/to/python); skipped with the reason when absent.

    .venv/bin/python bench/bench_datascreen.py [--seeds 3] [--no-art]

Writes bench/out/datascreen.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
TARGET = 0
PATCH_PIXELS = ([5, 6, 7, 5, 7], [5, 6, 7, 7, 5])  # an X in the bottom-right 3x3 corner


def patch(x: np.ndarray) -> np.ndarray:
    img = x.reshape(-1, 8, 8).copy()
    img[:, 5:8, 5:8] = 0.0
    img[:, PATCH_PIXELS[0], PATCH_PIXELS[1]] = 1.0
    return img.reshape(len(x), 64)


BLEND = np.random.default_rng(1234).random(64)


def blend(x: np.ndarray) -> np.ndarray:
    return 0.8 * x + 0.2 * BLEND


def make_case(name: str, x: np.ndarray, y: np.ndarray, seed: int):
    """(x, y, poisoned mask, trigger function or None) for one case."""
    rng = np.random.default_rng(seed)
    x, y = x.copy(), y.copy()
    mask = np.zeros(len(y), bool)
    trigger = None
    if name.startswith(("badnets", "blended")):
        frac = float(name.split("-")[1]) / 100
        trigger = patch if name.startswith("badnets") else blend
        n = int(round(frac * np.sum(y == TARGET)))
        rows = rng.choice(np.flatnonzero(y != TARGET), n, replace=False)
        x[rows] = trigger(x[rows])
        y[rows] = TARGET
        mask[rows] = True
    elif name == "flips-random":
        rows = rng.choice(len(y), int(0.05 * len(y)), replace=False)
        y[rows] = (y[rows] + rng.integers(1, 10, len(rows))) % 10
        mask[rows] = True
    elif name == "flips-targeted":
        rows = rng.choice(np.flatnonzero(y == 1), int(0.2 * np.sum(y == 1)), replace=False)
        y[rows] = 7
        mask[rows] = True
    return x, y, mask, trigger


def rates(flag: np.ndarray, mask: np.ndarray, within: np.ndarray) -> dict[str, float | None]:
    def r(sel: np.ndarray) -> float | None:
        return round(float(flag[sel].mean()), 4) if sel.any() else None

    return {
        "tpr": r(mask),
        "fpr": r(~mask),
        "tpr_target": r(mask & within),
        "fpr_target": r(~mask & within),
        "flagged": int(flag.sum()),
    }


def auc(scores: np.ndarray, mask: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not mask.any() or mask.all():
        return None
    return round(float(roc_auc_score(mask, np.nan_to_num(scores, nan=0.0))), 4)


def attack_success(x, y, trigger, x_test, y_test, keep, seed) -> dict[str, float]:
    from sklearn.neural_network import MLPClassifier

    out = {}
    triggered = trigger(x_test[y_test != TARGET])
    for label, rows in (("before", np.ones(len(y), bool)), ("after", keep)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = MLPClassifier((64,), max_iter=200, random_state=seed).fit(x[rows], y[rows])
        out[f"asr_{label}"] = round(float(np.mean(m.predict(triggered) == TARGET)), 4)
        out[f"clean_acc_{label}"] = round(float(m.score(x_test, y_test)), 4)
    return out


def cleanlab_alone(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The issue's anchor as it states it: cleanlab on 5-fold logistic-regression
    probabilities (our `labels` detector adds an SVM and a confident-mismatch rule)."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1)),
            x,
            y,
            cv=StratifiedKFold(5, shuffle=True, random_state=seed),
            method="predict_proba",
        )
    flags = find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return np.asarray(flags, bool), 1.0 - probs[np.arange(len(y)), y]


def art_flags(x, y, seed, python: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, x=x, y=y)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [python, str(ROOT / "bench" / "art_anchor.py"), str(src), str(dst), str(seed)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        d = np.load(dst)
        return {"art-activation": d["ac"].astype(bool), "art-spectral": d["ss"].astype(bool)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument("--out", default="datascreen.json", help="file name under bench/out/")
    ap.add_argument(
        "--cases",
        default="clean,badnets-5,badnets-10,badnets-33,blended-10,flips-random,flips-targeted",
    )
    args = ap.parse_args()
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits

    from pipeline.scan.data.interface import Dataset
    from pipeline.scan.data.policy import ScreenPolicy
    from pipeline.scan.data.screen import screen

    art_python = os.environ.get("ART_PYTHON", "/tmp/art-venv/bin/python")
    art_skip = None
    if args.no_art:
        art_skip = "--no-art"
    elif not Path(art_python).is_file():
        art_skip = f"no ART venv at {art_python} (see the docstring to make one)"
    d = load_digits()
    x_all, y_all = d.data / 16.0, d.target
    order = np.random.default_rng(42).permutation(len(y_all))
    cut = int(0.8 * len(order))
    x0, y0 = x_all[order[:cut]], y_all[order[:cut]]
    x_test, y_test = x_all[order[cut:]], y_all[order[cut:]]
    policy = ScreenPolicy()
    rows = []
    # the full screen of the full digits (1797 rows), as `scan data` runs it
    t0 = time.perf_counter()
    full = screen(Dataset(x=x_all, y=y_all, name="digits"), policy)
    full_s = time.perf_counter() - t0
    print(
        f"full screen of the digits ({len(y_all)} rows): {full_s:.1f}s, "
        f"{full.flagged_rows()} rows flagged",
        flush=True,
    )
    for case in args.cases.split(","):
        for seed in range(args.seeds):
            x, y, mask, trigger = make_case(case, x0, y0, seed)
            within = y == (7 if case == "flips-targeted" else TARGET)
            report = screen(Dataset(x=x, y=y, name=case), policy)
            scores = {r.detector: r.scores for r in report.results}
            flags = {"screen": np.zeros(len(y), bool)}
            for f in report.findings:
                if f.split == "train":
                    flags["screen"][f.index] = True
            for det in ("labels", "backdoor"):
                flags[det] = np.zeros(len(y), bool)
                for f in report.findings:
                    if f.detector == det:
                        flags[det][f.index] = True
            with threadpool_limits(limits=1):
                flags["cleanlab"], scores["cleanlab"] = cleanlab_alone(x, y, seed)
            if art_skip is None:
                try:
                    flags.update(art_flags(x, y, seed, art_python))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    art_skip = f"ART failed: {e}"
            for method, flag in flags.items():
                row = {"case": case, "seed": seed, "method": method, **rates(flag, mask, within)}
                if method in scores:
                    row["roc_auc"] = auc(scores[method], mask)
                if method == "screen":
                    row["verdict"] = report.verdict
                    row["seconds"] = round(report.seconds, 2)
                    if trigger is not None:
                        with threadpool_limits(limits=1):
                            row.update(attack_success(x, y, trigger, x_test, y_test, ~flag, seed))
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "full_screen_seconds": round(full_s, 2),
        "full_screen_flagged": full.flagged_rows(),
        "art": art_skip or "ran",
        "rows": rows,
        "summary": summary,
    }
    (OUT / args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print_table(summary, full_s, art_skip)
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (case, method)."""
    keys = sorted({(r["case"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    out = []
    for case, method in keys:
        group = [r for r in rows if r["case"] == case and r["method"] == method]
        mean = {"case": case, "method": method, "seeds": len(group)}
        for field in (
            "tpr",
            "fpr",
            "tpr_target",
            "fpr_target",
            "roc_auc",
            "asr_before",
            "asr_after",
            "clean_acc_before",
            "clean_acc_after",
            "seconds",
        ):
            vals = [r[field] for r in group if r.get(field) is not None]
            if vals:
                mean[field] = round(float(np.mean(vals)), 4)
        out.append(mean)
    return out


def print_table(summary: list[dict], full_s: float, art_skip: str | None) -> None:
    cols = ("tpr", "fpr", "tpr_target", "fpr_target", "roc_auc", "asr_before", "asr_after")
    print(f"{'case':15} {'method':15} " + " ".join(f"{c:>10}" for c in cols))
    for r in summary:
        cells = " ".join(f"{r[c]:10.3f}" if c in r else f"{'-':>10}" for c in cols)
        print(f"{r['case']:15} {r['method']:15} {cells}")
    print(f"full screen of the digits: {full_s:.1f}s (target < 30 s)")
    if art_skip:
        print(f"ART anchors skipped: {art_skip}")


if __name__ == "__main__":
    sys.exit(main())
