"""Deploy is a gate: verify the chain so far, and only then declare the release.

The stage verifies every upstream link against the owner-signed layout and the files on disk
(with public keys only). Its product, release.json, names what is released; the runner then
verifies the whole chain, this link included, and publishes the bundle atomically.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import VerificationError
from pipeline.hashing import hash_tree
from pipeline.provenance.chain import DiskArtifacts, verify_chain
from pipeline.provenance.keys import load_public_key
from pipeline.provenance.statements import read_verified_statement
from pipeline.runner.gates import model_candidates, recheck, recheck_data_screen
from pipeline.scan.vulns import VulnerabilitiesFound
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import write_json

RELEASE = "release.json"


class DeployParams(Params):
    pass


class DeployStage(Stage):
    kind = "deploy"
    Params = DeployParams
    outputs = (RELEASE,)
    gate = True
    publishes = True

    def run(self, ctx: StageContext) -> None:
        gate = ctx.extra.get("gate")
        if not gate:
            raise StageError("deploy ran without the runner's gate information")
        owner = load_public_key(Path(gate["owner_key"]))
        try:
            report = verify_chain(
                layout_path=Path(gate["layout"]),
                link_dir=Path(gate["links"]),
                owner=owner,
                disk=DiskArtifacts(Path(gate["run_dir"])),
                only_steps=gate["steps"],
                target=gate["run_dir"],
            )
        except VerificationError as e:
            raise StageError(
                "refusing to deploy: the chain so far does not verify\n" + e.diagnostics()
            ) from e
        for check, detail in report.checks:
            print(f"gate: {check}: {detail}")
        dependency_verdict = self._recheck_dependencies(ctx)
        print(f"gate: {dependency_verdict}")
        model_verdict = self._recheck_models(ctx)
        print(f"gate: {model_verdict}")
        data_verdict = self._recheck_data(ctx)
        if data_verdict:
            print(f"gate: {data_verdict}")
        candidate_verdict = self._recheck_candidate(ctx)
        if candidate_verdict:
            print(f"gate: {candidate_verdict}")
        released = {}
        for dep, path in ctx.inputs.items():
            released.update(hash_tree(path, prefix=f"{dep}/"))
        release = ctx.extra.get("release", {})
        write_json(
            ctx.output(RELEASE),
            {
                "name": release.get("name"),
                "version": release.get("version"),
                "run_id": ctx.run_id,
                "files": released,
                "gate": {
                    "dependencies": dependency_verdict,
                    "models": model_verdict,
                    **({"candidate": candidate_verdict} if candidate_verdict else {}),
                    "verified_steps": gate["steps"],
                    "owner_keyid": owner.keyid,
                    "checks": [c for c, _ in report.checks],
                },
            },
        )

    @staticmethod
    def _recheck_dependencies(ctx: StageContext) -> str:
        """Verify the runner's signed scan result and re-apply the policy to it today."""
        checks = ctx.extra.get("checks") or {}
        path = ctx.workdir / checks.get("dependencies", "../checks/dependencies.intoto.json")
        functionary = load_public_key(Path(checks["functionary_key"]))
        try:
            stmt = read_verified_statement(path, [functionary])
            return recheck(stmt, required=bool(checks.get("dependencies_required")))
        except (VerificationError, VulnerabilitiesFound) as e:
            raise StageError("refusing to deploy: " + e.diagnostics()) from e

    @staticmethod
    def _recheck_models(ctx: StageContext) -> str:
        """Every model file released must have been scanned, and passed, by the runner."""
        checks = ctx.extra.get("checks") or {}
        functionary = load_public_key(Path(checks["functionary_key"]))
        try:
            stmt = read_verified_statement(ctx.workdir / checks["models"], [functionary])
        except VerificationError as e:
            raise StageError("refusing to deploy: " + e.diagnostics()) from e
        pred = stmt["predicate"]
        scanned = {r["path"] for r in pred.get("scanned", [])}
        for dep, path in ctx.inputs.items():
            for target in model_candidates(path):
                name = f"{dep}/{target.relative_to(path).as_posix()}"
                if name not in scanned:
                    raise StageError(f"refusing to deploy: model file {name} was never scanned")
        if pred.get("verdict") != "pass":
            raise StageError(f"refusing to deploy: model scan verdict {pred.get('verdict')}")
        return f"models scanned and clean at fail_on={pred['policy']['fail_on']}: {len(scanned)}"

    @staticmethod
    def _recheck_data(ctx: StageContext) -> str | None:
        """With a data screen in the pipeline: its signed verdict, for this run, still holds."""
        checks = ctx.extra.get("checks") or {}
        if "data" not in checks:
            return None
        functionary = load_public_key(Path(checks["functionary_key"]))
        try:
            stmt = read_verified_statement(ctx.workdir / checks["data"], [functionary])
            return recheck_data_screen(stmt, ctx.run_id, ctx.workdir.parent)
        except VerificationError as e:
            raise StageError("refusing to deploy: " + e.diagnostics()) from e

    @staticmethod
    def _recheck_candidate(ctx: StageContext) -> str | None:
        """A candidate deploys only with a passing, signed comparison against production."""
        checks = ctx.extra.get("checks") or {}
        if "candidate" not in checks:
            return None
        functionary = load_public_key(Path(checks["functionary_key"]))
        try:
            stmt = read_verified_statement(ctx.workdir / checks["candidate"], [functionary])
        except VerificationError as e:
            raise StageError("refusing to deploy the candidate: " + e.diagnostics()) from e
        result = stmt["predicate"].get("result")
        if result != "PASSED":
            failed = "; ".join(stmt["predicate"].get("failedTests", []))
            raise StageError(f"refusing to deploy the candidate: the gate says {result}: {failed}")
        return "candidate gate PASSED against production"


if __name__ == "__main__":
    raise SystemExit(main(DeployStage))
