"""Training: a Keras model from the config on the sourced dataset, deterministic on CPU.

Input pipeline in tf.data; augmentation as Keras preprocessing layers inside the model graph
(active only while training), driven by the seed's ImageDataGenerator knobs. Evaluation on
the held-out split with per-class precision/recall, a confusion matrix and two plots.

The only built-in stage that imports TensorFlow, and only inside run(): validating a config
or listing stage kinds never pays TensorFlow's import time.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import read_npz, write_json
from stages._keras import canonicalize_keras_file

MODEL = "model.keras"
SAVED_MODEL = "saved_model/"
METRICS = "metrics.json"
CURVES = "training_curves.png"
CONFUSION = "confusion_matrix.png"

# ImageDataGenerator knobs with no Keras preprocessing-layer equivalent: refused, not ignored.
REFUSED_KNOBS = {
    "channel_shift_range": "no Keras layer shifts channels by a random constant",
    "brightness_range": "RandomBrightness adds a delta; ImageDataGenerator multiplies — not equal",
    "zca_whitening": "needs statistics fitted on the data set; no preprocessing layer does it",
    "featurewise_center": "use a Normalization layer in the model's layers instead",
    "featurewise_std_normalization": "use a Normalization layer in the model's layers instead",
    "samplewise_center": "no per-sample centring layer",
    "samplewise_std_normalization": "no per-sample normalising layer",
    "rescale": "set `scale` in the source stage instead",
    "preprocessing_function": "arbitrary Python is not allowed in a reproducible config",
}


class Augmentation(Params):
    """The seed's ImageDataGenerator knobs, mapped onto Keras preprocessing layers."""

    rotation_range: float = Field(0, ge=0, le=180, description="degrees")
    width_shift_range: float = Field(0, ge=0, lt=1, description="fraction of the width")
    height_shift_range: float = Field(0, ge=0, lt=1, description="fraction of the height")
    shear_range: float = Field(0, ge=0, lt=90, description="degrees")
    zoom_range: float = Field(0, ge=0, lt=1)
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"] = "nearest"
    cval: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _refuse_unmappable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for knob, why in REFUSED_KNOBS.items():
                if knob in data:
                    raise ValueError(f"'{knob}' has no Keras preprocessing-layer equivalent: {why}")
        return data


class LayerSpec(Params):
    """One hidden layer. The output Dense(classes, softmax) is always appended."""

    type: Literal[
        "conv2d",
        "maxpool2d",
        "avgpool2d",
        "flatten",
        "dense",
        "dropout",
        "batchnorm",
        "globalavgpool2d",
    ]
    filters: int | None = Field(None, gt=0)
    kernel_size: int | None = Field(None, gt=0)
    units: int | None = Field(None, gt=0)
    pool_size: int | None = Field(None, gt=0)
    rate: float | None = Field(None, ge=0, lt=1)
    activation: str | None = None
    padding: Literal["valid", "same"] = "valid"

    _needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv2d": ("filters", "kernel_size"),
        "dense": ("units",),
        "dropout": ("rate",),
    }

    @model_validator(mode="after")
    def _complete(self) -> LayerSpec:
        missing = [f for f in self._needs.get(self.type, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} layer needs {', '.join(missing)}")
        return self


SEED_CNN = (
    LayerSpec(type="conv2d", filters=32, kernel_size=3, activation="relu"),
    LayerSpec(type="maxpool2d", pool_size=2),
    LayerSpec(type="flatten"),
)


class EarlyStopping(Params):
    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = "val_loss"
    patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best_weights: bool = True


class BaseModelSpec(Params):
    """Where a fine-tune starts: a release bundle (verified against its owner key), or a
    file/URL pinned by sha256. The runner fetches, verifies and scans it; see basemodel.py."""

    bundle: str | None = None
    owner_key: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the owner's sha256 key fingerprint (from the owner, not the bundle)",
    )
    owner_key_file: str | None = Field(None, description="the owner's public key file")
    file: str | None = Field(None, description="model file in the bundle's artifacts/")
    path: str | None = None
    url: str | None = Field(None, pattern=r"^https?://")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_origin(self) -> BaseModelSpec:
        given = [k for k in ("bundle", "path", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bundle, path, url (got {given or 'none'})")
        if self.bundle and not (self.owner_key or self.owner_key_file):
            raise ValueError(
                "a bundle needs owner_key (the fingerprint of the key you trust) or "
                "owner_key_file (the owner's public key file)"
            )
        if not self.bundle and not self.sha256:
            raise ValueError("a path or url needs a sha256 pin")
        return self


class TrainParams(Params):
    base_model: BaseModelSpec | None = None
    layers: tuple[LayerSpec, ...] = Field(SEED_CNN, min_length=1)
    augmentation: Augmentation = Augmentation()
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(5, gt=0, le=10_000)
    batch_size: int = Field(32, gt=0)
    validation_split: float = Field(0.1, ge=0, lt=1)
    early_stopping: EarlyStopping | None = None
    seed: int = 42


def augmentation_layers(keras, a: Augmentation, seed: int) -> list:
    fill = {"fill_mode": a.fill_mode, "fill_value": a.cval}
    out = []
    if a.rotation_range:
        out.append(keras.layers.RandomRotation(a.rotation_range / 360.0, seed=seed, **fill))
    if a.width_shift_range or a.height_shift_range:
        out.append(
            keras.layers.RandomTranslation(
                a.height_shift_range, a.width_shift_range, seed=seed + 1, **fill
            )
        )
    if a.shear_range:
        # ImageDataGenerator's shear is an angle; Keras' is the fraction sheared: tan(angle).
        t = math.tan(math.radians(a.shear_range))
        out.append(keras.layers.RandomShear(x_factor=t, seed=seed + 2, **fill))
    if a.zoom_range:
        out.append(keras.layers.RandomZoom(a.zoom_range, a.zoom_range, seed=seed + 3, **fill))
    flip = ("horizontal" if a.horizontal_flip else "") + (
        "_and_vertical" if a.horizontal_flip and a.vertical_flip else ""
    )
    if a.vertical_flip and not a.horizontal_flip:
        flip = "vertical"
    if flip:
        out.append(keras.layers.RandomFlip(flip, seed=seed + 4))
    return out


def hidden_layer(keras, spec: LayerSpec):
    L = keras.layers
    match spec.type:
        case "conv2d":
            k = spec.kernel_size
            return L.Conv2D(spec.filters, (k, k), activation=spec.activation, padding=spec.padding)
        case "maxpool2d":
            return L.MaxPooling2D((spec.pool_size or 2,) * 2)
        case "avgpool2d":
            return L.AveragePooling2D((spec.pool_size or 2,) * 2)
        case "globalavgpool2d":
            return L.GlobalAveragePooling2D()
        case "flatten":
            return L.Flatten()
        case "dense":
            return L.Dense(spec.units, activation=spec.activation)
        case "dropout":
            return L.Dropout(spec.rate)
        case "batchnorm":
            return L.BatchNormalization()
    raise StageError(f"unknown layer type {spec.type}")  # unreachable: validated


def build_model(keras, input_shape, classes: int, p: TrainParams):
    """Augmentation layers, then the configured layers, then Dense(classes, softmax)."""
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            *augmentation_layers(keras, p.augmentation, p.seed),
            *(hidden_layer(keras, s) for s in p.layers),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def make_datasets(tf, x, y, p: TrainParams):
    """tf.data pipelines; the validation split is the tail, as Keras' validation_split does."""
    n_val = int(len(x) * p.validation_split)
    x_fit, y_fit = x[: len(x) - n_val], y[: len(y) - n_val]
    train = (
        tf.data.Dataset.from_tensor_slices((x_fit, y_fit))
        .shuffle(len(x_fit), seed=p.seed, reshuffle_each_iteration=True)
        .batch(p.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    val = None
    if n_val:
        val = tf.data.Dataset.from_tensor_slices((x[-n_val:], y[-n_val:])).batch(p.batch_size)
    return train, val


def evaluate(model, x_test, y_test, classes: int) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    pred = np.argmax(model.predict(x_test, verbose=0), axis=1)
    labels = list(range(classes))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_test, pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "samples": int(len(y_test)),
        "per_class": {
            str(c): {
                "precision": float(prec[c]),
                "recall": float(rec[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in labels
        },
        "confusion_matrix": confusion_matrix(y_test, pred, labels=labels).tolist(),
    }


def plot_curves(history: dict[str, list[float]], path) -> None:
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


def plot_confusion(matrix: list[list[int]], path) -> None:
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


class TrainStage(Stage):
    kind = "train"
    Params = TrainParams
    outputs = (MODEL, SAVED_MODEL, METRICS, CURVES, CONFUSION)
    model_output = MODEL
    determinism = {
        "keras.utils.set_random_seed": "params.seed",
        "tf.config.experimental.enable_op_determinism": True,
        "TF_DETERMINISTIC_OPS": "1",
        "PYTHONHASHSEED": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "keras_file": "canonicalized (fixed zip times, date_saved, shared_object_id)",
    }

    def run(self, ctx: StageContext) -> None:
        p: TrainParams = ctx.params
        dataset = ctx.find_input("dataset.npz")
        manifest = json.loads(ctx.find_input("manifest.json").read_text())
        data = read_npz(dataset)
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
        convolutional = any(s.type.endswith("2d") for s in p.layers)
        if (convolutional or p.augmentation != Augmentation()) and x_train.ndim != 4:
            raise StageError(
                f"convolutions and image augmentation need images (N, H, W, C); the dataset "
                f"has shape {x_train.shape}",
                hint="set image_shape in the source stage's params",
            )

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        keras = tf.keras
        # Same config, data and lock on the same machine -> byte-identical weights.
        keras.utils.set_random_seed(p.seed)
        tf.config.experimental.enable_op_determinism()

        classes = int(manifest["classes"])
        if p.base_model is not None:
            model = self._load_base(ctx, keras, classes)
        else:
            model = build_model(keras, x_train.shape[1:], classes, p)
        optimizer = {
            "adam": keras.optimizers.Adam,
            "sgd": keras.optimizers.SGD,
            "rmsprop": keras.optimizers.RMSprop,
        }[p.optimizer](learning_rate=p.learning_rate)
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        train_ds, val_ds = make_datasets(tf, x_train, y_train, p)
        callbacks = []
        if p.early_stopping:
            es = p.early_stopping
            if es.monitor.startswith("val_") and val_ds is None:
                raise StageError(f"early_stopping monitors {es.monitor} but validation_split is 0")
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=es.monitor,
                    patience=es.patience,
                    min_delta=es.min_delta,
                    restore_best_weights=es.restore_best_weights,
                )
            )
        history = model.fit(
            train_ds, validation_data=val_ds, epochs=p.epochs, callbacks=callbacks, verbose=2
        )
        hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        test = evaluate(model, x_test, y_test, classes)

        model.save(ctx.output(MODEL))
        canonicalize_keras_file(ctx.output(MODEL))
        # A SavedModel for serving (TF Serving, tf.saved_model.load); inference graph only.
        model.export(str(ctx.output(SAVED_MODEL)), format="tf_saved_model", verbose=False)
        plot_curves(hist, ctx.output(CURVES))
        plot_confusion(test["confusion_matrix"], ctx.output(CONFUSION))
        write_json(
            ctx.output(METRICS),
            {
                "test": test,
                "history": hist,
                "epochs_run": len(next(iter(hist.values()), [])),
                "params": p.model_dump(mode="json"),
                "model": {
                    "parameters": int(model.count_params()),
                    "layers": [layer.__class__.__name__ for layer in model.layers],
                },
                "dataset": {
                    "name": manifest["name"],
                    "sha256": sha256_file(dataset),
                    "source": manifest["source"],
                    "split": manifest["split"],
                    # What the model was trained on: serve refuses inputs outside this range.
                    "input_shape": [int(d) for d in x_train.shape[1:]],
                    "input_range": [float(x_train.min()), float(x_train.max())],
                },
                "framework": {"tensorflow": tf.__version__, "keras": keras.__version__},
            },
        )
        print(f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}")

    @staticmethod
    def _load_base(ctx: StageContext, keras, classes: int):
        """The runner-verified base model: digest re-checked on the bytes read, safe_mode."""
        import hashlib
        import tempfile
        from pathlib import Path

        info = ctx.extra.get("base_model") or {}
        data = (ctx.workdir / info["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise StageError("the base model changed after the runner verified it; refusing")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "base_model.keras"
            path.write_bytes(data)
            model = keras.models.load_model(path, safe_mode=True)
        if model.output_shape[-1] != classes:
            raise StageError(
                f"the base model predicts {model.output_shape[-1]} classes; the data has {classes}"
            )
        print(f"fine-tuning from base model sha256 {info['sha256']}")
        return model


if __name__ == "__main__":
    raise SystemExit(main(TrainStage))
