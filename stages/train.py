"""Training: the seed's Keras CNN on the sourced dataset, seeded and deterministic on CPU.

The only built-in stage that imports TensorFlow, and only inside run(): validating a config
or listing stage kinds never pays TensorFlow's import time.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import Field

from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import read_npz, write_json

MODEL = "model.keras"
METRICS = "metrics.json"


class TrainParams(Params):
    epochs: int = Field(5, gt=0, le=10_000)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    validation_split: float = Field(0.1, ge=0, lt=1)
    seed: int = 42
    filters: int = Field(32, gt=0)
    kernel_size: int = Field(3, gt=0)
    pool_size: int = Field(2, gt=0)


def build_seed_cnn(keras, input_shape, classes: int, p: TrainParams):
    """The seed's model: Conv2D(32, 3x3, relu) -> MaxPooling(2x2) -> Flatten -> Dense softmax."""
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            keras.layers.Conv2D(p.filters, (p.kernel_size, p.kernel_size), activation="relu"),
            keras.layers.MaxPooling2D((p.pool_size, p.pool_size)),
            keras.layers.Flatten(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


class TrainStage(Stage):
    kind = "train"
    Params = TrainParams
    outputs = (MODEL, METRICS)

    def run(self, ctx: StageContext) -> None:
        p: TrainParams = ctx.params
        dataset = ctx.find_input("dataset.npz")
        manifest = json.loads(ctx.find_input("manifest.json").read_text())
        data = read_npz(dataset)
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
        if x_train.ndim != 4:
            raise StageError(
                f"the seed CNN needs images (N, H, W, C); the dataset has shape {x_train.shape}",
                hint="set image_shape in the source stage's params",
            )

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        keras = tf.keras
        # Same config, data and lock on the same machine -> byte-identical weights.
        keras.utils.set_random_seed(p.seed)
        tf.config.experimental.enable_op_determinism()

        classes = int(manifest["classes"])
        model = build_seed_cnn(keras, x_train.shape[1:], classes, p)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=p.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        started = time.perf_counter()
        history = model.fit(
            x_train,
            y_train,
            epochs=p.epochs,
            batch_size=p.batch_size,
            validation_split=p.validation_split,
            shuffle=True,
            verbose=2,
        )
        seconds = time.perf_counter() - started
        loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
        model.save(ctx.output(MODEL))
        write_json(
            ctx.output(METRICS),
            {
                "test": {
                    "accuracy": float(accuracy),
                    "loss": float(loss),
                    "samples": int(len(x_test)),
                },
                "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
                "train_seconds": round(seconds, 3),
                "params": p.model_dump(),
                "dataset": {
                    "name": manifest["name"],
                    "sha256": sha256_file(dataset),
                    "source": manifest["source"],
                    "split": manifest["split"],
                },
                "framework": {"tensorflow": tf.__version__, "keras": keras.__version__},
                "determinism": {"set_random_seed": p.seed, "op_determinism": True},
            },
        )
        print(f"test accuracy {accuracy:.4f}, loss {loss:.4f}")


if __name__ == "__main__":
    raise SystemExit(main(TrainStage))
