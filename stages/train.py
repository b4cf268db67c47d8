"""Training: a Keras model from the config on the sourced dataset, deterministic on CPU.

Input pipeline in tf.data. Augmentation (the seed's ImageDataGenerator knobs) is one projective
transform per image, composed from rotation, shift, shear, zoom and flips and applied once in
the training input pipeline, so nothing of it is saved in the model. Evaluation on the held-out
split with per-class precision/recall, a confusion matrix and two plots.

The only built-in stage that imports TensorFlow, and only inside run(): validating a config
or listing stage kinds never pays TensorFlow's import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline import cluster
from pipeline.bounded import read_json
from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from pipeline.workspace import DATA_MANIFEST
from stages._io import read_npz, write_json
from stages._keras import canonicalize_keras_file

if TYPE_CHECKING:  # imported in run(): it imports numpy, which train loads only to train
    from stages._shards import Shards

MODEL = "model.keras"
SAVED_MODEL = "saved_model/"
METRICS = "metrics.json"
CURVES = "training_curves.png"
CONFUSION = "confusion_matrix.png"

# ImageDataGenerator knobs the geometric transform does not cover: refused, not ignored.
REFUSED_KNOBS = {
    "channel_shift_range": "not a geometric transform; no equivalent is implemented",
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
    """The seed's ImageDataGenerator knobs, composed into one projective transform per image."""

    rotation_range: float = Field(0, ge=0, le=180, description="degrees")
    width_shift_range: float = Field(0, ge=0, lt=1, description="fraction of the width")
    height_shift_range: float = Field(0, ge=0, lt=1, description="fraction of the height")
    shear_range: float = Field(0, ge=0, lt=90, description="degrees")
    zoom_range: float = Field(0, ge=0, lt=1)
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"] = "nearest"
    cval: float = Field(0.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unmappable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for knob, why in REFUSED_KNOBS.items():
                if knob in data:
                    raise ValueError(f"'{knob}' has no Keras preprocessing-layer equivalent: {why}")
        return data

    @property
    def active(self) -> bool:
        """Whether any knob transforms images (fill_mode and cval alone change nothing)."""
        return self != Augmentation(fill_mode=self.fill_mode, cval=self.cval)


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


MAX_WORKERS = 16  # beyond this one machine's loopback is not where the job belongs


class Distribution(Params):
    """How training is spread: TensorFlow's own strategies, nothing home-made.

    `multi_worker_mirrored`: `workers` processes, each a full replica, gradients all-reduced
    (the runner starts them; see pipeline/runner/distributed.py). `mirrored`: one process over
    its local devices. `hosts` (host:port, one per worker, the chief first) names a real
    cluster; without it the workers listen on 127.0.0.1 inside a private network namespace.
    """

    strategy: Literal["multi_worker_mirrored", "mirrored"]
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    hosts: tuple[str, ...] | None = None
    # How the runner starts worker i >= 1 on hosts[i] (argv, `{host}` substituted; default
    # ssh into remote_checkout, this machine's checkout path unless set): pipeline/cluster.py.
    launcher: tuple[str, ...] | None = None
    remote_checkout: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.strategy == "mirrored" and (self.workers != 1 or self.hosts):
            raise ValueError("mirrored runs in one process: workers must be 1 and no hosts")
        if self.hosts is None and (self.launcher is not None or self.remote_checkout):
            raise ValueError("launcher and remote_checkout start workers on hosts: name hosts")
        if self.hosts is not None:
            cluster.check_hosts(self.hosts, self.workers)
            if self.launcher is not None:
                cluster.check_launcher(self.launcher)
            if self.remote_checkout is not None:
                cluster.check_checkout(self.remote_checkout)
        return self


class TrainParams(Params):
    base_model: BaseModelSpec | None = None
    distribution: Distribution | None = None
    layers: tuple[LayerSpec, ...] = Field(SEED_CNN, min_length=1)
    augmentation: Augmentation = Augmentation()
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(5, gt=0, le=10_000)
    batch_size: int = Field(32, gt=0)
    validation_split: float = Field(0.1, ge=0, lt=1)
    early_stopping: EarlyStopping | None = None
    # keras.utils.set_random_seed seeds numpy too, which takes only 0 <= seed < 2**32.
    seed: int = Field(42, ge=0, lt=2**32)
    # Images streamed from shards (an image source): how many are shuffled at a time. Memory
    # is this many images, not the dataset; shards are also shuffled each epoch.
    shuffle_buffer: int = Field(4096, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _distributable(self) -> TrainParams:
        if self.distribution is not None and self.early_stopping is not None:
            raise ValueError(
                "early_stopping is not supported with distribution (the custom training loop "
                "has no Keras callbacks); drop one of them"
            )
        return self


# --------------------------------------------------------------------------- augmentation
#
# ImageDataGenerator builds, per image, M = R(theta) . T(shift) . Sh(shear) . Z(zx, zy) about
# the image centre and resamples once (scipy, bilinear), then flips. The same matrix here,
# with the flips folded in, becomes the 8 parameters of TensorFlow's ImageProjectiveTransformV3
# (which maps each output pixel (x=column, y=row) to the input point it samples): one
# resampling per image instead of one per Keras layer. The functions below take the array
# module `xp` (numpy or tensorflow) so the algebra is unit-tested without TensorFlow.

UNIFORMS_PER_IMAGE = 8  # theta, dx, dy, shear, zx, zy, flip x, flip y
# Arrays of shape (N,), in that order.
TransformParams = tuple[Any, Any, Any, Any, Any, Any, Any, Any]


def draw_transform_params(
    xp: Any, u: Any, a: Augmentation, height: int, width: int
) -> TransformParams:
    """ImageDataGenerator's random draws from uniforms u of shape (N, 8) in [0, 1):
    theta and shear in radians, shifts in pixels, zooms, and flips as -1 (flip) or +1."""

    def sym(col: int, bound: float) -> Any:  # uniform in [-bound, bound)
        return bound * (2.0 * u[:, col] - 1.0)

    def flip(col: int, on: bool) -> Any:  # -1 or +1, each with probability 1/2
        return 2.0 * xp.floor(2.0 * u[:, col]) - 1.0 if on else xp.ones_like(u[:, col])

    return (
        sym(0, math.radians(a.rotation_range)),
        sym(1, a.width_shift_range * width),
        sym(2, a.height_shift_range * height),
        sym(3, math.radians(a.shear_range)),
        1.0 + sym(4, a.zoom_range),
        1.0 + sym(5, a.zoom_range),
        flip(6, a.horizontal_flip),
        flip(7, a.vertical_flip),
    )


def compose_transforms(
    xp: Any,
    theta: Any,
    dx: Any,
    dy: Any,
    shear: Any,
    zx: Any,
    zy: Any,
    fx: Any,
    fy: Any,
    height: int,
    width: int,
) -> Any:
    """(N, 8) projective parameters [a0, a1, a2, a3, a4, a5, 0, 0]: output pixel (x, y) samples
    the input at (a0 x + a1 y + a2, a3 x + a4 y + a5).

    In coordinates centred on the image, input = M . F . output with
    M = R(theta) . T(dx, dy) . Sh(shear) . Z(zx, zy) (ImageDataGenerator's matrices, in its
    order) and F = diag(fx, fy) the flips, which ImageDataGenerator applies to its output.
    R . Sh . Z multiplies out to [[cos t zx, -sin(t + s) zy], [sin t zx, cos(t + s) zy]], and
    the shift is rotated: R . (dx, dy).
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos_t, sin_t = xp.cos(theta), xp.sin(theta)
    l00, l01 = cos_t * zx * fx, -xp.sin(theta + shear) * zy * fy
    l10, l11 = sin_t * zx * fx, xp.cos(theta + shear) * zy * fy
    mx, my = cos_t * dx - sin_t * dy, sin_t * dx + cos_t * dy
    zero = xp.zeros_like(theta)
    return xp.stack(
        [
            l00,
            l01,
            cx + mx - (l00 * cx + l01 * cy),
            l10,
            l11,
            cy + my - (l10 * cx + l11 * cy),
            zero,
            zero,
        ],
        axis=-1,
    )


def augment(tf: Any, dataset: Any, a: Augmentation, seed: int) -> Any:
    """Batches of (images, labels) -> the same, each image through its own random transform.

    The draws are stateless, keyed by a seed per batch from tf.data's own random stream,
    which yields a new sequence each epoch and the same sequences in every run with this seed.
    """
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def transform(batch: Any, batch_seed: Any) -> Any:
        images, labels = batch
        shape = tf.shape(images)
        height, width = images.shape[1], images.shape[2]
        u = tf.random.stateless_uniform(
            tf.stack([shape[0], UNIFORMS_PER_IMAGE]), seed=batch_seed, dtype=tf.float32
        )
        params = draw_transform_params(tf, u, a, height, width)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=compose_transforms(tf, *params, height, width),
            output_shape=shape[1:3],
            fill_value=tf.constant(a.cval, tf.float32),
            interpolation="BILINEAR",
            fill_mode=a.fill_mode.upper(),
        )
        return images, labels

    return tf.data.Dataset.zip((dataset, seeds)).map(
        transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


# Imported by `tf.keras` for optional features the train stage never uses: Keras's
# scikit-learn wrappers (scikit-learn, and scipy through it) and keras.visualization's
# plot_image_gallery (matplotlib.pyplot). Both modules catch the ImportError and leave only
# those features unavailable. About 1.5-2 s of CPU per train stage start on this machine.
UNUSED_BY_KERAS_IMPORT = ("sklearn", "matplotlib.pyplot")


def import_tensorflow() -> Any:
    """`import tensorflow`, without the optional modules tf.keras pulls in and training never
    uses (UNUSED_BY_KERAS_IMPORT). Only while TensorFlow is first imported: afterwards the
    process can import them as usual, and a process that already has TensorFlow is untouched."""
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    blocked = [name for name in UNUSED_BY_KERAS_IMPORT if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes its import fail
    try:
        import tensorflow as tf

        tf.keras  # noqa: B018  # the lazy keras import happens here, while they are blocked
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return tf


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
    """The configured layers, then Dense(classes, softmax); augmentation is not in the model."""
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            *(hidden_layer(keras, s) for s in p.layers),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def make_datasets(tf, x, y, p: TrainParams):
    """tf.data pipelines; the validation split is the tail, as Keras' validation_split does.
    Augmentation is for training only: the validation pipeline is never augmented."""
    n_val = int(len(x) * p.validation_split)
    x_fit, y_fit = x[: len(x) - n_val], y[: len(y) - n_val]
    train = (
        tf.data.Dataset.from_tensor_slices((x_fit, y_fit))
        .shuffle(len(x_fit), seed=p.seed, reshuffle_each_iteration=True)
        .batch(p.batch_size)
    )
    if p.augmentation.active:
        train = augment(tf, train, p.augmentation, p.seed)
    train = train.prefetch(tf.data.AUTOTUNE)
    val = None
    if n_val:
        val = tf.data.Dataset.from_tensor_slices((x[-n_val:], y[-n_val:])).batch(p.batch_size)
    return train, val


def stream_datasets(tf: Any, shards: Shards, p: TrainParams) -> tuple[Any, Any]:
    """make_datasets for an image dataset: the same batches, augmentation and validation
    role, streamed from the shards (the validation images are each shard's tail)."""
    train = shards.dataset(
        tf,
        "fit",
        batch_size=p.batch_size,
        validation_split=p.validation_split,
        shuffle_buffer=p.shuffle_buffer,
        seed=p.seed,
    )
    if p.augmentation.active:
        train = augment(tf, train, p.augmentation, p.seed)
    train = train.prefetch(tf.data.AUTOTUNE)
    val = None
    if shards.validation_rows(p.validation_split):
        val = shards.dataset(
            tf, "val", batch_size=p.batch_size, validation_split=p.validation_split
        )
    return train, val


def evaluate_streamed(tf: Any, model: Any, shards: Shards, batch_size: int) -> dict[str, Any]:
    """evaluate() on the held-out shards, streamed; only the labels are held whole."""
    import numpy as np

    test = shards.dataset(tf, "test", batch_size=batch_size)
    loss, accuracy = model.evaluate(test, verbose=0)
    pred = np.argmax(model.predict(test, verbose=0), axis=1)
    y_test = shards.labels("test")
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "samples": int(len(y_test)),
        **classification_report(y_test, pred, shards.classes),
    }


def classification_report(y_true: Any, y_pred: Any, classes: int) -> dict[str, Any]:
    """Per-class precision/recall/f1/support and the confusion matrix, as scikit-learn's
    precision_recall_fscore_support(labels=0..K-1, zero_division=0) and confusion_matrix
    compute them (the same float64 divisions), without importing scikit-learn (a second of
    the train stage's start-up). Labels outside 0..K-1 are left out, as there."""
    import numpy as np

    t, q = np.asarray(y_true, np.int64).ravel(), np.asarray(y_pred, np.int64).ravel()
    keep = (t >= 0) & (t < classes) & (q >= 0) & (q < classes)
    matrix = np.bincount(t[keep] * classes + q[keep], minlength=classes * classes)
    matrix = matrix.reshape(classes, classes)
    tp = np.diag(matrix)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)

    def ratio(num: Any, den: Any) -> Any:
        return np.divide(num, den, out=np.zeros(classes), where=den != 0)

    prec, rec = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2.0 * tp, support.astype(np.float64) + predicted)
    return {
        "per_class": {
            str(c): {
                "precision": float(prec[c]),
                "recall": float(rec[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in range(classes)
        },
        "confusion_matrix": matrix.tolist(),
    }


def evaluate(model, x_test, y_test, classes: int) -> dict[str, Any]:
    import numpy as np

    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    pred = np.argmax(model.predict(x_test, verbose=0), axis=1)
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "samples": int(len(y_test)),
        **classification_report(y_test, pred, classes),
    }


def plot_curves(history: dict[str, list[float]], path) -> None:
    # matplotlib's object-oriented API: the same Agg rendering and bytes as pyplot's, without
    # importing pyplot (which import_tensorflow keeps out of the process)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_confusion(matrix: list[list[int]], path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
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


# --------------------------------------------------------------------------- distributed
#
# Keras 3's model.fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585: "Attempt
# to convert a value (PerReplica:{...})"), so the distributed path is a custom loop over the
# same Keras model: the dataset distributed by the strategy, one strategy.run per step, the loss
# averaged over the global batch, the Keras optimizer applying the all-reduced gradients.

TIMING_PREFIX = "chainproof-timing "  # one stdout line the bench reads; never in a product
PROBE_ROUNDS = 10


def worker_task(d: Distribution) -> tuple[int, dict[str, Any]]:
    """(this worker's index, TF_CONFIG) from the environment the runner set, checked against
    the params: a worker started by hand with another cluster is refused, not trusted."""
    import json

    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise StageError(
            "distribution.strategy multi_worker_mirrored needs TF_CONFIG; the runner sets it",
            hint="run the pipeline with `chainproof run`, which starts every worker",
        )
    try:
        tf_config = json.loads(raw)
        cluster = tf_config["cluster"]["worker"]
        index = tf_config["task"]["index"]
        kind = tf_config["task"]["type"]
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"TF_CONFIG is not a worker's cluster spec: {e}") from None
    if (
        kind != "worker"
        or not isinstance(index, int)
        or not isinstance(cluster, list)
        or len(cluster) != d.workers
        or not 0 <= index < d.workers
    ):
        raise StageError(
            f"TF_CONFIG names task {kind} {index} of {len(cluster)} worker(s); the params say "
            f"{d.workers}"
        )
    return index, tf_config


def make_strategy(tf: Any, d: Distribution) -> Any:
    if d.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    impl = tf.distribute.experimental.CommunicationImplementation.RING  # CPU: ring all-reduce
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl)
    )


def predict_batches(model: Any, x: Any, batch_size: int) -> Any:
    """Class probabilities, batch by batch, in this process only (no collective): every
    worker holds the same weights, so any of them can evaluate."""
    import numpy as np

    out = [
        np.asarray(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def scores(probs: Any, y: Any) -> tuple[float, float]:
    """(mean sparse categorical cross-entropy, accuracy), as Keras computes them (eps-clipped)."""
    import numpy as np

    if len(y) == 0:
        return 0.0, 0.0
    picked = np.clip(probs[np.arange(len(y)), np.asarray(y, np.int64)], 1e-7, 1.0)
    return float(-np.mean(np.log(picked))), float(np.mean(np.argmax(probs, 1) == y))


def weights_sha256(model: Any) -> str:
    """Digest of every weight's bytes, in model order: equal on every worker after a step."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    return h.hexdigest()


def fit_distributed(
    tf: Any,
    keras: Any,
    make_model: Any,
    make_optimizer: Any,
    x: Any,
    y: Any,
    p: TrainParams,
    progress: Callable[[int, int, dict[str, float]], None],
) -> tuple[Any, dict[str, list[float]], dict[str, Any]]:
    """(model, history, what ran): the custom loop under the configured strategy.

    `progress` gets each finished epoch (the runner streams the chief's to the terminal)."""
    import time

    import numpy as np

    d = p.distribution
    assert d is not None
    strategy = make_strategy(tf, d)
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer()
    n_val = int(len(x) * p.validation_split)
    x_fit, y_fit = x[: len(x) - n_val], y[: len(y) - n_val]
    x_val, y_val = x[len(x) - n_val :], y[len(y) - n_val :]
    if len(x_fit) < p.batch_size:
        raise StageError(
            f"{len(x_fit)} training sample(s) make no full batch of {p.batch_size}; distributed "
            "training drops the last partial batch (every worker must run the same steps)",
            hint="lower batch_size or use more data",
        )
    # batch_size is the global batch: each of the replicas gets batch_size / replicas of it.
    train = tf.data.Dataset.from_tensor_slices((x_fit, y_fit)).shuffle(
        len(x_fit), seed=p.seed, reshuffle_each_iteration=True
    )
    train = train.batch(p.batch_size, drop_remainder=True)
    if p.augmentation.active:
        train = augment(tf, train, p.augmentation, p.seed)
    options = tf.data.Options()
    # Every worker builds the same dataset from the same array; DATA sharding gives each its
    # slice of every global batch (FILE sharding needs files).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dist = strategy.experimental_distribute_dataset(train.with_options(options))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="none")
    global_batch = p.batch_size

    def replica_step(images: Any, labels: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            probs = model(images, training=True)
            loss = tf.nn.compute_average_loss(
                loss_fn(labels, probs), global_batch_size=global_batch
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        hits = tf.cast(tf.argmax(probs, axis=-1), labels.dtype) == labels
        return loss, tf.reduce_sum(tf.cast(hits, tf.float32))

    @tf.function
    def train_step(images: Any, labels: Any) -> tuple[Any, Any]:
        loss, hits = strategy.run(replica_step, args=(images, labels))
        total = tf.distribute.ReduceOp.SUM
        return strategy.reduce(total, loss, axis=None), strategy.reduce(total, hits, axis=None)

    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if n_val:
        history.update(val_loss=[], val_accuracy=[])
    step_times: list[float] = []
    steps = 0
    for epoch in range(p.epochs):
        losses, hits, seen = [], 0.0, 0
        for images, labels in dist:
            t0 = time.perf_counter()
            loss, correct = train_step(images, labels)
            losses.append(float(loss))  # float() waits for the step: the time is the step's
            step_times.append(time.perf_counter() - t0)
            hits += float(correct)
            seen += global_batch
            steps += 1
        history["loss"].append(float(np.mean(losses)))
        history["accuracy"].append(hits / seen)
        line = f"epoch {epoch + 1}/{p.epochs}: loss {history['loss'][-1]:.4f}"
        if n_val:
            val_loss, val_acc = scores(predict_batches(model, x_val, p.batch_size), y_val)
            history["val_loss"].append(val_loss)
            history["val_accuracy"].append(val_acc)
            line += f", val_loss {val_loss:.4f}"
        print(line, flush=True)
        progress(epoch + 1, p.epochs, {k: v[-1] for k, v in history.items()})
    ran = {
        "path": "custom_loop",
        "strategy": d.strategy,
        "workers": d.workers,
        "replicas_in_sync": int(strategy.num_replicas_in_sync),
        "global_batch_size": global_batch,
        "steps": steps,
        "partial_batch": "dropped",
    }
    print(TIMING_PREFIX + _timing(tf, strategy, model, step_times), flush=True)
    return model, history, ran


def _timing(tf: Any, strategy: Any, model: Any, step_times: list[float]) -> str:
    """Step times and an all-reduce probe of the gradients' size: the share of a step spent in
    collective communication, for the bench. Logged, never in a product (it is not
    reproducible)."""
    import json
    import time

    def probe() -> Any:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.zeros_like(v) for v in model.trainable_variables]
        )

    fn = tf.function(lambda: strategy.run(probe))
    fn()  # traced and the collective's ring set up, outside the timing
    t0 = time.perf_counter()
    for _ in range(PROBE_ROUNDS):
        out = fn()
    float(tf.reduce_sum(strategy.experimental_local_results(out)[0][0]))
    collective = (time.perf_counter() - t0) / PROBE_ROUNDS
    steady = step_times[1:] or step_times  # the first step includes tracing
    per_step = sum(steady) / len(steady) if steady else 0.0
    return json.dumps(
        {
            "steps": len(step_times),
            "first_step_s": step_times[0] if step_times else 0.0,
            "step_s": per_step,
            "allreduce_s": collective,
            "collective_share": min(1.0, collective / per_step) if per_step else 0.0,
        },
        sort_keys=True,
    )


def evaluate_local(
    model: Any, x_test: Any, y_test: Any, classes: int, batch: int
) -> dict[str, Any]:
    """evaluate() for a model trained under a strategy: the same figures, computed here."""
    import numpy as np

    probs = predict_batches(model, x_test, batch)
    loss, accuracy = scores(probs, y_test)
    pred = np.argmax(probs, axis=1) if len(probs) else np.zeros((0,), np.int64)
    return {
        "accuracy": accuracy,
        "loss": loss,
        "samples": int(len(y_test)),
        **classification_report(y_test, pred, classes),
    }


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
        # the source stage's product: read bounded, a bad one is an error naming the file
        manifest_path = ctx.find_input("manifest.json")
        manifest = read_json(manifest_path, what="dataset manifest")
        if not isinstance(manifest, dict):
            raise StageError("the source stage's manifest.json is not a JSON object")
        shards: Shards | None = None
        if "shards" in manifest:  # an image dataset: streamed from its shards, never whole
            from stages._shards import Shards

            shards = Shards.from_manifest(manifest, manifest_path.parent)
            dataset = ctx.find_input(DATA_MANIFEST)
            input_shape: tuple[int, ...] = shards.shape
        else:
            dataset = ctx.find_input("dataset.npz")
            data = read_npz(dataset)
            x_train, y_train = data["x_train"], data["y_train"]
            x_test, y_test = data["x_test"], data["y_test"]
            input_shape = tuple(int(d) for d in x_train.shape[1:])
        convolutional = any(s.type.endswith("2d") for s in p.layers)
        if (convolutional or p.augmentation.active) and len(input_shape) != 3:
            raise StageError(
                f"convolutions and image augmentation need images (N, H, W, C); the dataset "
                f"has examples of shape {input_shape}",
                hint="set image_shape in the source stage's params",
            )

        d = p.distribution
        if d is not None and shards is not None:
            raise StageError(
                "distribution trains from the in-memory dataset.npz; an image source's shards "
                "are streamed by single-process training only",
                hint="remove `distribution` from the train params for an image dataset",
            )
        chief = True
        if d is not None and d.strategy == "multi_worker_mirrored":
            index, _ = worker_task(d)  # checked before TF loads
            chief = index == 0  # the chief writes the model; the others only train

        tf = import_tensorflow()
        keras = tf.keras
        # Same config, data and lock on the same machine -> byte-identical weights.
        keras.utils.set_random_seed(p.seed)
        tf.config.experimental.enable_op_determinism()

        classes = int(manifest["classes"])

        def make_model() -> Any:
            if p.base_model is not None:
                return self._load_base(ctx, keras, classes)
            return build_model(keras, input_shape, classes, p)

        def make_optimizer() -> Any:
            return {
                "adam": keras.optimizers.Adam,
                "sgd": keras.optimizers.SGD,
                "rmsprop": keras.optimizers.RMSprop,
            }[p.optimizer](learning_rate=p.learning_rate)

        if d is not None:
            model, hist, ran = fit_distributed(
                tf, keras, make_model, make_optimizer, x_train, y_train, p, ctx.progress
            )
            print(f"weights sha256 {weights_sha256(model)}", flush=True)
            if not chief:
                print("worker done; the chief writes the outputs")
                return
            test = evaluate_local(model, x_test, y_test, classes, p.batch_size)
            input_range = [float(x_train.min()), float(x_train.max())]
        else:
            model, optimizer = make_model(), make_optimizer()  # before the datasets' seeded ops
            if shards is not None:
                train_ds, val_ds = stream_datasets(tf, shards, p)
            else:
                train_ds, val_ds = make_datasets(tf, x_train, y_train, p)
            model, hist = self._fit(keras, model, optimizer, train_ds, val_ds, p, ctx.progress)
            ran = {"path": "keras_fit", "strategy": "default", "workers": 1}
            if shards is not None:
                test = evaluate_streamed(tf, model, shards, p.batch_size)
                input_range = [float(v) for v in shards.input_range]
            else:
                test = evaluate(model, x_test, y_test, classes)
                input_range = [float(x_train.min()), float(x_train.max())]

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
                    # the split file, or for images the canonical manifest (= the pin)
                    "file": dataset.name,
                    "sha256": sha256_file(dataset),
                    "source": manifest["source"],
                    "split": manifest["split"],
                    # What the model was trained on: serve refuses inputs outside this range.
                    "input_shape": list(input_shape),
                    "input_range": input_range,
                },
                "framework": {"tensorflow": tf.__version__, "keras": keras.__version__},
                "training": ran,  # which path ran: keras_fit, or the custom loop and strategy
            },
        )
        print(f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}")

    @staticmethod
    def _fit(
        keras: Any,
        model: Any,
        optimizer: Any,
        train_ds: Any,
        val_ds: Any,
        p: TrainParams,
        progress: Callable[[int, int, dict[str, float]], None],
    ) -> tuple[Any, dict[str, list[float]]]:
        """Single-process training: Keras' own model.fit; each finished epoch to `progress`."""
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
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
        # Each finished epoch to the runner, which streams it to the terminal (the log keeps
        # Keras's own lines too). Reading `logs` touches no random state.
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: progress(epoch + 1, p.epochs, logs or {})
            )
        )
        history = model.fit(
            train_ds, validation_data=val_ds, epochs=p.epochs, callbacks=callbacks, verbose=2
        )
        return model, {k: [float(v) for v in vals] for k, vals in history.history.items()}

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
