"""Run IBM ART's ActivationDefence and SpectralSignatureDefense on one case (bench helper).

Runs inside a throwaway venv with `adversarial-robustness-toolbox` and scikit-learn (never the
project's): reads x, y from an .npz, trains a one-hidden-layer MLP, exposes its hidden layer
to ART through a minimal classifier adapter, writes ART's per-row poison flags to an .npz.

    python art_anchor.py IN.npz OUT.npz SEED
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")


class MLPActivations:
    """What ART's poison defences read from a classifier: its layers' activations."""

    def __init__(self, model, scaler) -> None:
        self.model, self.scaler = model, scaler
        self.layer_names = ["hidden"]  # the penultimate layer is the one ART protects
        self.nb_classes = len(model.classes_)
        self.input_shape = (model.coefs_[0].shape[0],)
        self.channels_first = False
        self.clip_values = None

    def get_activations(self, x, layer=0, batch_size=128, framework=False):
        xs = self.scaler.transform(x.reshape(len(x), -1))
        return np.maximum(0, xs @ self.model.coefs_[0] + self.model.intercepts_[0])

    def predict(self, x, batch_size=128, **kw):
        return self.model.predict_proba(self.scaler.transform(x.reshape(len(x), -1)))


def main() -> None:
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    d = np.load(src)
    x, y = d["x"], d["y"]
    scaler = StandardScaler().fit(x)
    model = MLPClassifier((64,), max_iter=150, random_state=seed).fit(scaler.transform(x), y)
    clf = MLPActivations(model, scaler)
    onehot = np.eye(clf.nb_classes)[y]
    ac = ActivationDefence(clf, x, onehot)
    _, clean_ac = ac.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA")
    ss = SpectralSignatureDefense(
        clf, x, onehot, batch_size=128, eps_multiplier=1.5, expected_pp_poison=0.1
    )
    _, clean_ss = ss.detect_poison()
    np.savez(dst, ac=1 - np.asarray(clean_ac), ss=1 - np.asarray(clean_ss))


if __name__ == "__main__":
    main()
