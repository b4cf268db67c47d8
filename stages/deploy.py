"""Deploy is a gate: verify the chain so far, and only then declare the release.

The stage verifies every upstream link against the owner-signed layout and the files on disk
(with public keys only). Its product, release.json, names what is released; the runner then
verifies the whole chain, this link included, and publishes the bundle atomically.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import VerificationError
from pipeline.hashing import hash_artifacts, list_tree
from pipeline.provenance.keys import load_public_key
from pipeline.provenance.verify import DiskArtifacts, verify_chain
from pipeline.stage import Params, Stage, StageContext, StageError, main
from stages._io import write_json

RELEASE = "release.json"


class DeployParams(Params):
    pass


class DeployStage(Stage):
    kind = "deploy"
    Params = DeployParams
    outputs = (RELEASE,)

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
        released = {}
        for dep, path in ctx.inputs.items():
            released.update(hash_artifacts(list_tree(path, prefix=f"{dep}/")))
        release = ctx.extra.get("release", {})
        write_json(
            ctx.output(RELEASE),
            {
                "name": release.get("name"),
                "version": release.get("version"),
                "run_id": ctx.run_id,
                "files": released,
                "gate": {
                    "verified_steps": gate["steps"],
                    "owner_keyid": owner.keyid,
                    "checks": [c for c, _ in report.checks],
                },
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(DeployStage))
