"""The MLflow pyfunc of a release: MLflow's models-from-code file, so loading never unpickles.

MLflow executes this file when it loads the model (lineage logs it with the release bundle as
the model's one artifact). `load_context` verifies that bundle against the owner key and loads
the weights through `load_verified`; a changed byte of the bundle raises before Keras sees it.
chainproof itself never imports this module: only MLflow does, so it may import mlflow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.errors import InputError

# The owner's fingerprint from another channel; it wins over the one recorded with the model,
# which is only as trustworthy as the MLflow store that holds it.
OWNER_KEY_ENV = "CHAINPROOF_OWNER_KEY"
BUNDLE_ARTIFACT = "bundle"
CONFIG_OWNER_KEY = "owner_key"
CONFIG_MIN_VERSION = "min_version"


def owner_key_for(model_config: dict[str, Any] | None) -> str:
    """The fingerprint to verify against: $CHAINPROOF_OWNER_KEY, else model_config's."""
    configured = os.environ.get(OWNER_KEY_ENV, "").strip()
    recorded = (model_config or {}).get(CONFIG_OWNER_KEY)
    key = configured or (recorded if isinstance(recorded, str) else "")
    if not key:
        raise InputError(
            "this chainproof model records no owner key, and none is configured",
            hint=f"set {OWNER_KEY_ENV}=<owner fingerprint> (from the owner, not from the bundle) "
            f"or pass model_config={{'{CONFIG_OWNER_KEY}': '<fingerprint>'}} to load_model",
        )
    return key


class ChainproofReleaseModel(PythonModel):
    """Class probabilities of a verified release's Keras model."""

    def load_context(self, context: PythonModelContext) -> None:
        from pipeline.release.loading import load_verified
        from pipeline.release.serving import card_input_range

        config = context.model_config or {}
        bundle = Path(context.artifacts[BUNDLE_ARTIFACT])
        min_version = config.get(CONFIG_MIN_VERSION)
        self.model = load_verified(
            bundle,
            owner_key=owner_key_for(config),
            min_version=min_version if isinstance(min_version, str) else None,
        )
        self.input_shape = tuple(int(d) for d in self.model.input_shape[1:])
        self.input_range = card_input_range(bundle)  # read after the bundle verified

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim >= 1 and x.shape[1:] != self.input_shape:
            if x.ndim >= 2 and math.prod(x.shape[1:]) == math.prod(self.input_shape):
                x = x.reshape((len(x), *self.input_shape))  # flattened rows, as in a DataFrame
            else:
                raise InputError(
                    f"each input must have shape {list(self.input_shape)}; got {list(x.shape[1:])}"
                )
        if not np.isfinite(x).all():
            raise InputError("inputs must be finite numbers (no NaN or infinity)")
        if self.input_range is not None:
            lo, hi = self.input_range
            outside = int(np.count_nonzero((x < lo) | (x > hi)))
            if outside:
                raise InputError(
                    f"{outside} of {x.size} value(s) lie outside [{lo:g}, {hi:g}], the range of "
                    "the training data (the model card's input.range); scale inputs the same way"
                )
        return np.asarray(self.model.predict(x, verbose=0), dtype=np.float32)


set_model(ChainproofReleaseModel())
