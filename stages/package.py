"""Packaging: the model, its metrics and a model card that names the digest of each."""

from __future__ import annotations

import json
import shutil

from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, main
from stages._io import write_json

MODEL, METRICS, CARD = "model.keras", "metrics.json", "model_card.json"


class PackageParams(Params):
    intended_use: str = "Demonstration: classify 8x8 grey-scale images of handwritten digits."
    limitations: str = (
        "Trained on a small, clean dataset; not evaluated on real-world handwriting or "
        "adversarial inputs."
    )


class PackageStage(Stage):
    kind = "package"
    Params = PackageParams
    outputs = (MODEL, METRICS, CARD)

    def run(self, ctx: StageContext) -> None:
        p: PackageParams = ctx.params
        for name in (MODEL, METRICS):
            shutil.copyfile(ctx.find_input(name), ctx.output(name))
        metrics = json.loads(ctx.output(METRICS).read_text())
        write_json(
            ctx.output(CARD),
            {
                "model": {
                    "name": ctx.extra.get("pipeline", ctx.run_id),
                    "format": "keras",
                    "file": MODEL,
                    "sha256": sha256_file(ctx.output(MODEL)),
                },
                "metrics_file": {"file": METRICS, "sha256": sha256_file(ctx.output(METRICS))},
                "training_data": metrics["dataset"],
                "metrics": metrics["test"],
                "training_params": metrics["params"],
                "framework": metrics["framework"],
                "intended_use": p.intended_use,
                "limitations": p.limitations,
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(PackageStage))
