"""The stage contract: what a stage kind implements, and how its subprocess starts.

A stage runs as `python -I -m <its module> <spec.json>` inside the run, in its own working
directory, in a locked environment. It reads its spec, writes its declared outputs into its
working directory, and exits. It never signs anything and never sees a key: the runner
records and signs. This module imports only the standard library and pydantic, so a stage
in a small environment of its own can use it.
"""

from __future__ import annotations

import json
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline.errors import Error

# One line a stage prints to stdout per finished epoch; the runner shows it on the terminal
# (pipeline/runner/progress.py reads it back, as hostile input).
PROGRESS_PREFIX = "chainproof-progress: "


class StageError(Error):
    """A stage could not do its job; the message says why and what to change."""

    exit_code = 4


class Params(BaseModel):
    """Base for a stage kind's parameters: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StageContext:
    run_id: str
    stage: str
    params: Any
    workdir: Path
    inputs: dict[str, Path]
    outputs: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def input(self, stage: str, name: str) -> Path:
        """Path of file `name` produced by upstream stage `stage`."""
        try:
            return self.inputs[stage] / name
        except KeyError:
            raise StageError(
                f"stage '{self.stage}' has no input from {stage!r}",
                hint=f"add '{stage}' to this stage's needs in the config",
            ) from None

    def output(self, name: str) -> Path:
        if name not in self.outputs and f"{name}/" not in self.outputs:
            raise StageError(f"{name!r} is not a declared output of stage '{self.stage}'")
        return self.workdir / name

    def progress(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        """Report one finished epoch (1-based) to the runner, which streams it to the user.

        Flushed at once: stdout is a file here, block-buffered otherwise."""
        clean = {str(k): float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        body = json.dumps({"epoch": epoch, "epochs": epochs, "metrics": clean}, sort_keys=True)
        print(PROGRESS_PREFIX + body, flush=True)

    def find_input(self, name: str) -> Path:
        """The file `name` from whichever upstream stage produced it (exactly one must)."""
        hits = [d / name for d in self.inputs.values() if (d / name).is_file()]
        if len(hits) != 1:
            found = "none" if not hits else ", ".join(str(h) for h in hits)
            raise StageError(
                f"stage '{self.stage}' needs exactly one upstream {name!r}; found {found}",
                hint="check this stage's needs in the config",
            )
        return hits[0]


class Stage(ABC):
    """One kind of stage. Subclasses set `kind`, `Params`, `outputs` and implement `run`."""

    kind: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    outputs: ClassVar[tuple[str, ...]] = ()
    # Switches that make the stage reproducible, recorded in its link's environment.
    determinism: ClassVar[dict[str, Any]] = {}
    # A gate consumes the runner's signed checks (dependency scan, ...) as materials.
    gate: ClassVar[bool] = False
    # A release is published after this stage succeeds; its products name their run.
    publishes: ClassVar[bool] = False
    # The model file this stage writes (what a comparison or a candidate gate reads).
    model_output: ClassVar[str | None] = None
    # A data screen: the runner signs the verdict of its report as a gate Statement.
    screens: ClassVar[bool] = False

    @classmethod
    def needs_network(cls, params: Any) -> bool:
        """Whether the stage itself reaches the network with these params (e.g. a URL source).

        The config must then declare `network: true`; every other stage runs with none.
        """
        return False

    @classmethod
    def outputs_for(cls, params: Any) -> tuple[str, ...]:
        """What the stage writes with these params (a source of images writes shards, not
        one array file); by default the kind's fixed `outputs`."""
        return tuple(cls.outputs)

    @classmethod
    def external_inputs(cls, params: Any) -> dict[str, str]:
        """Files outside the run the stage reads, by parameter name, as the config gives them.

        The runner resolves each against the config's directory, refuses one inside the
        signing keys, binds it read-only into the sandbox and passes the resolved path in the
        spec's `extra.external`.
        """
        return {}

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Do the work; write every declared output under ctx.workdir."""


def main(cls: type[Stage], argv: list[str] | None = None) -> int:
    """Entry point of a stage subprocess: `python -I -m stages.<kind> SPEC`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -I -m {cls.__module__} SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    workdir = Path.cwd()
    ctx = StageContext(
        run_id=spec["run_id"],
        stage=spec["stage"],
        params=cls.Params.model_validate(spec["params"]),
        workdir=workdir,
        inputs={k: (workdir / v).resolve() for k, v in spec["inputs"].items()},
        outputs=tuple(spec["outputs"]),
        extra=spec.get("extra", {}),
    )
    try:
        cls().run(ctx)
    except Error as e:  # an expected failure: say why; a crash keeps its traceback
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        return 1
    return 0
