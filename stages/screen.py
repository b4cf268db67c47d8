"""Screening: a gate between source and train that looks at what the data says.

It runs the policy's detectors (pipeline.scan.data) over the upstream canonical dataset's
training rows (and test rows, for leaks) and writes the report. A screen that fails under
`action: fail` stops the run before any model is trained; the runner signs the report's
verdict into checks/data.intoto.json, which deploy REQUIREs and re-checks.
"""

from __future__ import annotations

import json

from pipeline.scan.data.dataset import load
from pipeline.scan.data.interface import DataScreenError
from pipeline.scan.data.policy import ScreenPolicy
from pipeline.scan.data.screen import render_table, screen
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import write_json

REPORT = "data_screen.json"  # the name the runner, package and lineage look for
DATASET = "dataset.npz"


class ScreenParams(ScreenPolicy, Params):
    """The screen policy itself: detectors, fail_at, action, thresholds, seed."""


class ScreenStage(Stage):
    kind = "screen"
    Params = ScreenParams
    outputs = (REPORT,)
    determinism = {"threads": 1, "seeded": True}
    screens = True  # the runner signs its verdict as a gate Statement

    def run(self, ctx: StageContext) -> None:
        policy: ScreenParams = ctx.params
        path = ctx.find_input(DATASET)
        try:
            report = screen(load(path), policy)
        except DataScreenError as e:
            raise StageError(f"cannot screen {path.name}: {e.message}", hint=e.hint) from e
        data = report.to_dict()
        data["dataset"]["path"] = f"{path.parent.name}/{path.name}"
        write_json(ctx.output(REPORT), data)
        print(render_table(report, limit=20))
        if report.verdict == "fail":
            failed = json.dumps(data["summary"]["failed"], sort_keys=True)
            raise StageError(
                f"the data screen failed ({failed}); no model is trained from this data",
                hint=f"read {REPORT} for the rows (index = row of x_train), fix the data, or "
                "change the policy (fail_at, action: warn) in the config",
            )
        if report.verdict == "warn":
            print(f"WARNING: findings at the policy's threshold: {data['summary']['failed']}")


if __name__ == "__main__":
    raise SystemExit(main(ScreenStage))
