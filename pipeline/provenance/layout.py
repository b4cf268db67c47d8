"""Compile a pipeline config into the owner-signed in-toto layout (the root of trust).

One step per stage. Material rules first REQUIRE each declared output of every upstream
stage, then MATCH it against that stage's products; product rules REQUIRE and CREATE each
declared output. Every rule list ends in DISALLOW *, so nothing undeclared slips through
in-toto's implicit ALLOW. The expected command is enforced by our verifier (in-toto only
warns on a mismatch). One inspection lets in-toto-verify alone, run from the run directory,
reject a file changed after its step signed it (see `run_inspection`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from in_toto.models.layout import Inspection, Layout, Step

from pipeline.provenance.keys import PublicKey
from pipeline.provenance.links import envelope_bytes
from pipeline.workspace import (
    CHECKS_DIR,
    DATA,
    GATE_CHECKS,
    RUN_DIRS,
    RUN_RECORD,
    base_model_name,
    spec_name,
)

if TYPE_CHECKING:
    from securesystemslib.signer import Signer

    from pipeline.config import PipelineConfig, StageConfig


PINS_PREFIX = "chainproof-pins: "


@dataclass(frozen=True)
class LayoutPins:
    """What the owner reviewed and signed, beside the steps: the layout's readme carries it.

    A run under this layout is refused before any stage when its config, a lock or the code
    differs; verify checks every link against these digests.
    """

    pipeline: str
    config_sha256: str
    locks: dict[str, str]  # lock file name -> sha256
    code_sha256: str
    code: dict[str, str] = field(default_factory=dict)  # the pinned code manifest
    # "owner": signed beforehand by the owner; "runner": the one-machine convenience path,
    # signed on the fly for one run (then `run_id` names it).
    signed_by: str = "owner"
    run_id: str | None = None
    # step -> how many training workers it runs (distribution.workers): verify holds every
    # such link to exactly that many worker records.
    workers: dict[str, int] = field(default_factory=dict)

    def to_readme(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return f"chainproof layout for pipeline '{self.pipeline}'\n{PINS_PREFIX}{body}"


def pins_of(layout: Layout) -> LayoutPins | None:
    """The pins a signed layout carries, or None for a layout without them."""
    for line in str(layout.readme or "").splitlines():
        if line.startswith(PINS_PREFIX):
            try:
                data: Any = json.loads(line[len(PINS_PREFIX) :])
                return LayoutPins(**data)
            except (ValueError, TypeError):
                return None
    return None


def stage_command(module: str, stage: str) -> list[str]:
    """The command recorded for a stage, run from its own directory inside the run."""
    return ["python", "-I", "-m", module, f"../{spec_name(stage)}"]


def _material_rules(
    stage: StageConfig, config: PipelineConfig, checks: tuple[str, ...]
) -> list[list[str]]:
    """`checks`: the gate Statements this step consumes (each REQUIREd); empty for a non-gate."""
    rules: list[list[str]] = [["REQUIRE", spec_name(stage.name)]]
    rules += [["REQUIRE", check] for check in checks]
    for dep in stage.needs:
        for out in config.stage(dep).outputs:
            if not out.endswith("/"):  # a directory output is matched below, not REQUIREd
                rules.append(["REQUIRE", f"{dep}/{out}"])
    for dep in stage.needs:
        rules.append(["MATCH", f"{dep}/*", "WITH", "PRODUCTS", "FROM", dep])
    rules.append(["ALLOW", spec_name(stage.name)])
    rules.append(["ALLOW", "locks/*"])  # the exact locks every step ran under
    if stage.params.get("base_model"):  # fetched, verified and scanned by the runner
        rules.insert(0, ["REQUIRE", base_model_name(stage.name)])
        rules.append(["ALLOW", f"inputs/{stage.name}/*"])
    if checks:
        rules.append(["ALLOW", f"{CHECKS_DIR}/*"])
    rules.append(["DISALLOW", "*"])
    return rules


def _product_rules(stage: StageConfig) -> list[list[str]]:
    files = [o for o in stage.outputs if not o.endswith("/")]
    dirs = [o for o in stage.outputs if o.endswith("/")]
    rules = [["REQUIRE", f"{stage.name}/{out}"] for out in files]
    rules += [["CREATE", f"{stage.name}/{out}"] for out in files]
    rules += [["CREATE", f"{stage.name}/{out}*"] for out in dirs]
    rules.append(["DISALLOW", "*"])
    return rules


# The one inspection chainproof writes. in-toto-verify runs an inspection's command in its
# current directory and records every file there as the inspection's materials and
# products; the command does nothing, so the rules alone judge the run directory. The name
# holds a dot, which no stage name can (config NAME_PATTERN), so it never collides with a step.
INSPECTION_NAME = "run.artifacts"
INSPECTION_COMMAND = ["true"]
# What the runner keeps in a run directory beside the stages' own: not products of a step.
RUN_BOOKKEEPING = (RUN_RECORD, "config.yaml", *(f"{d}/*" for d in RUN_DIRS))


def _inspection_rules(config: PipelineConfig) -> list[list[str]]:
    """Every file under a stage's directory is a product that step signed, unchanged.

    MATCH consumes only files whose digest equals the step's signed product; what is left
    under the step's directory (a changed or an unattested file) meets the DISALLOW.
    REQUIRE catches a declared output that was deleted.
    """
    rules: list[list[str]] = []
    for stage in config.stages:
        rules += [
            ["REQUIRE", f"{stage.name}/{out}"] for out in stage.outputs if not out.endswith("/")
        ]
        rules.append(["MATCH", f"{stage.name}/*", "WITH", "PRODUCTS", "FROM", stage.name])
        rules.append(["DISALLOW", f"{stage.name}/*"])
    rules += [["ALLOW", pattern] for pattern in RUN_BOOKKEEPING]
    rules.append(["DISALLOW", "*"])
    return rules


def run_inspection(config: PipelineConfig) -> Inspection:
    """The inspection in-toto-verify runs from inside `runs/<run-id>/` (its cwd)."""
    rules = _inspection_rules(config)
    return Inspection(
        name=INSPECTION_NAME,
        run=list(INSPECTION_COMMAND),
        expected_materials=rules,
        expected_products=[list(r) for r in rules],
    )


def compile_layout(
    config: PipelineConfig,
    *,
    functionary: PublicKey,
    modules: dict[str, str],
    gates: frozenset[str] = frozenset(),
    pins: LayoutPins,
    release_key: PublicKey | None = None,
    extra_checks: tuple[str, ...] = (),
    now: datetime | None = None,
) -> Layout:
    """`modules` maps each stage kind to the module run for it (from the registry);
    `gates` names the kinds that consume the runner's gate Statements (deploy). A config
    with a data screen makes every gate REQUIRE the screen's signed verdict too."""
    checks = GATE_CHECKS + extra_checks
    if any(s.impl.screens for s in config.stages):
        checks += (DATA,)
    steps = [
        Step(
            name=s.name,
            expected_command=stage_command(modules[s.kind], s.name),
            expected_materials=_material_rules(s, config, checks if s.kind in gates else ()),
            expected_products=_product_rules(s),
            pubkeys=[functionary.keyid],
            threshold=1,
        )
        for s in config.stages
    ]
    expires = (now or datetime.now(UTC)) + timedelta(days=config.layout_expires_days)
    keys = {functionary.keyid: functionary.legacy_dict()}
    if release_key is not None:  # named, not authorised for any step: binds the OpenSSF key
        keys[release_key.keyid] = release_key.legacy_dict()
    layout = Layout(
        steps=steps,
        inspect=[run_inspection(config)],
        keys=keys,
        expires=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        readme=pins.to_readme(),
    )
    layout.validate()
    return layout


def signed_layout_bytes(layout: Layout, owner: Signer) -> bytes:
    return envelope_bytes(layout, owner)
