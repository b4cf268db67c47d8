"""The train stage's plots, drawn without pyplot, are byte for byte the PNGs pyplot drew."""

from __future__ import annotations

import subprocess
import sys

from stages.train import plot_confusion, plot_curves
from tests.conftest import ROOT

HISTORY = {
    "loss": [2.2, 1.9, 1.5, 1.0],
    "accuracy": [0.28, 0.72, 0.87, 0.89],
    "val_loss": [2.1, 1.8, 1.3, 0.8],
    "val_accuracy": [0.52, 0.83, 0.86, 0.87],
}
MATRIX = [[30, 0, 2], [1, 0, 0], [0, 4, 25]]  # a zero cell: no text drawn there


def pyplot_curves(history, path):
    """What the stage drew before, through pyplot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def pyplot_confusion(matrix, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (held-out split)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def test_training_curves_png_is_unchanged_without_pyplot(tmp_path):
    plot_curves(HISTORY, tmp_path / "ours.png")
    pyplot_curves(HISTORY, tmp_path / "pyplot.png")
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "pyplot.png").read_bytes()


def test_confusion_matrix_png_is_unchanged_without_pyplot(tmp_path):
    plot_confusion(MATRIX, tmp_path / "ours.png")
    pyplot_confusion(MATRIX, tmp_path / "pyplot.png")
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "pyplot.png").read_bytes()


def test_the_plots_never_import_pyplot(tmp_path):
    probe = (
        "import sys; from stages.train import plot_confusion, plot_curves; "
        f"plot_curves({HISTORY!r}, sys.argv[1] + '/c.png'); "
        f"plot_confusion({MATRIX!r}, sys.argv[1] + '/m.png'); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "m.png").stat().st_size > 0
