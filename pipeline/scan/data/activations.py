"""Backdoor detectors on the penultimate layer of a model trained on the data.

Activation clustering (Chen et al. 2018) splits each class's activations in two and calls
the smaller cluster poison when it is small and well separated; spectral signatures (Tran
et al. 2018) score each row by its projection on the class's top singular vector. The model
is a one-hidden-layer scikit-learn network: it trains in seconds on a CPU and needs no
TensorFlow, so screening never pays TensorFlow's start-up.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from pipeline.scan.data.interface import BACKDOOR, Dataset, Detector, DetectorResult, Finding

HIDDEN = 64
MAX_ROWS_FOR_MODEL = 200_000  # training cost grows with rows; above this, refuse (bounded time)


def penultimate(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Hidden-layer (ReLU) activations of a network trained on (x, y)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from pipeline.scan.data.interface import DataScreenError

    if len(x) > MAX_ROWS_FOR_MODEL:
        raise DataScreenError(
            f"{len(x)} rows is over the {MAX_ROWS_FOR_MODEL} the model-based detectors train on",
            hint="select detectors without a model (backdoor, labels, duplicates, balance)",
        )
    xs = StandardScaler().fit_transform(x)
    model = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=150, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 150 epochs fit digits well
        model.fit(xs, y)
    return np.asarray(np.maximum(0.0, xs @ model.coefs_[0] + model.intercepts_[0]))


def _robust_z(s: np.ndarray) -> np.ndarray:
    med = np.median(s)
    mad = 1.4826 * np.median(np.abs(s - med))
    return (s - med) / mad if mad > 0 else np.zeros_like(s)


class SpectralSignatureDetector(Detector):
    name = "spectral"
    kinds = (BACKDOOR,)
    needs_model = True

    def __init__(self, z: float = 10.0) -> None:
        self.z = z

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        t0 = time.perf_counter()
        h = penultimate(data.x, data.y, seed)
        z = np.full(len(data.y), np.nan)
        for c in np.unique(data.y):
            idx = np.flatnonzero(data.y == c)
            g = h[idx] - h[idx].mean(axis=0)
            if len(idx) < 3 or not np.any(g):
                z[idx] = 0.0
                continue
            _, _, vt = np.linalg.svd(g, full_matrices=False)
            z[idx] = _robust_z((g @ vt[0]) ** 2)
        flagged = np.flatnonzero(np.nan_to_num(z, nan=-np.inf) >= self.z)
        findings = tuple(Finding(int(i), BACKDOOR, float(z[i]), self.name) for i in flagged)
        summary = {"method": "spectral signatures on MLP penultimate layer", "z_threshold": self.z}
        return DetectorResult(self.name, findings, z, summary, time.perf_counter() - t0)


class ActivationClusteringDetector(Detector):
    name = "activation-clustering"
    kinds = (BACKDOOR,)
    needs_model = True

    def __init__(self, max_fraction: float = 0.35, min_silhouette: float = 0.25) -> None:
        self.max_fraction = max_fraction
        self.min_silhouette = min_silhouette

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
        from sklearn.metrics import silhouette_score

        t0 = time.perf_counter()
        h = penultimate(data.x, data.y, seed)
        scores = np.zeros(len(data.y))
        findings: list[Finding] = []
        suspicious: dict[str, float] = {}
        for c in np.unique(data.y):
            idx = np.flatnonzero(data.y == c)
            if len(idx) < 10:
                continue
            k = min(10, len(idx) - 1, h.shape[1])
            reduced = PCA(n_components=k, random_state=seed).fit_transform(h[idx])
            km = KMeans(n_clusters=2, n_init=5, random_state=seed).fit(reduced)
            sizes = np.bincount(km.labels_, minlength=2)
            if sizes.min() == 0:
                continue
            small = int(np.argmin(sizes))
            sil = float(silhouette_score(reduced, km.labels_))
            fraction = sizes[small] / len(idx)
            members = idx[km.labels_ == small]
            # a row's score: how separated its class's split is, if it is in the small cluster
            scores[members] = sil
            if fraction <= self.max_fraction and sil >= self.min_silhouette:
                suspicious[str(int(c))] = round(sil, 3)
                findings += [
                    Finding(int(i), BACKDOOR, sil, self.name, detail=f"class {int(c)}")
                    for i in members
                ]
        summary = {
            "method": "2-means on PCA of MLP penultimate layer, per class",
            "max_fraction": self.max_fraction,
            "min_silhouette": self.min_silhouette,
            "suspicious_classes": suspicious,
        }
        return DetectorResult(self.name, tuple(findings), scores, summary, time.perf_counter() - t0)
