"""Each named check of verify_chain, on a tiny two-step chain signed here (no stages, no TF)."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from in_toto.models.layout import Inspection, Layout, Step
from securesystemslib.signer import CryptoSigner

from pipeline.errors import VerificationError
from pipeline.hashing import hash_tree
from pipeline.provenance.chain import DiskArtifacts, verify_chain, verify_inspections
from pipeline.provenance.keys import KeyPair, PublicKey
from pipeline.provenance.layout import (
    INSPECTION_COMMAND,
    INSPECTION_NAME,
    LayoutPins,
    signed_layout_bytes,
)
from pipeline.provenance.links import write_link

CMD = {"make": ["python", "-I", "-m", "stages.make"], "use": ["python", "-I", "-m", "stages.use"]}
PINS = LayoutPins(
    pipeline="tiny",
    config_sha256="c" * 64,
    locks={"main.txt": "l" * 64},
    code_sha256="d" * 64,
)


def keypair(role: str) -> KeyPair:
    signer = CryptoSigner.generate_ed25519()
    return KeyPair(role, signer, PublicKey(signer.public_key))


class Chain:
    """A run directory with two steps, `make` (writes make/data.bin) and `use` (reads it)."""

    def __init__(
        self,
        root: Path,
        *,
        expires_days: int = 7,
        pins: LayoutPins = PINS,
        inspect: list[Inspection] | None = None,
    ) -> None:
        self.root, self.links = root / "run", root / "links"
        self.links.mkdir(parents=True)
        (self.root / "make").mkdir(parents=True)
        (self.root / "use").mkdir()
        (self.root / "make" / "data.bin").write_bytes(b"training data")
        (self.root / "use" / "model.bin").write_bytes(b"weights")
        self.owner, self.functionary = keypair("owner"), keypair("functionary")
        kid = self.functionary.public.keyid
        steps = [
            Step(
                name="make",
                expected_command=CMD["make"],
                expected_materials=[["DISALLOW", "*"]],
                expected_products=[["CREATE", "make/data.bin"], ["DISALLOW", "*"]],
                pubkeys=[kid],
                threshold=1,
            ),
            Step(
                name="use",
                expected_command=CMD["use"],
                expected_materials=[
                    ["MATCH", "make/*", "WITH", "PRODUCTS", "FROM", "make"],
                    ["DISALLOW", "*"],
                ],
                expected_products=[["CREATE", "use/model.bin"], ["DISALLOW", "*"]],
                pubkeys=[kid],
                threshold=1,
            ),
        ]
        expires = datetime.now(UTC) + timedelta(days=expires_days)
        layout = Layout(
            steps=steps,
            inspect=inspect or [],
            keys={kid: self.functionary.public.legacy_dict()},
            expires=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            readme=pins.to_readme(),
        )
        self.layout = root / "root.layout"
        self.layout.write_bytes(signed_layout_bytes(layout, self.owner.signer))

    def env(self, **over: object) -> dict[str, object]:
        return {
            "run_id": "run-1",
            "config_sha256": PINS.config_sha256,
            "lock_sha256": PINS.locks["main.txt"],
            "code": {"sha256": PINS.code_sha256},
            **over,
        }

    def link(self, step: str, *, rc: int = 0, command: list[str] | None = None, **env: object):
        materials = hash_tree(self.root / "make", prefix="make/") if step == "use" else {}
        products = hash_tree(self.root / step, prefix=f"{step}/")
        write_link(
            self.links,
            name=step,
            materials=materials,
            products=products,
            command=command or CMD[step],
            byproducts={"return-value": rc},
            environment=self.env(**env),
            signer=self.functionary.signer,
        )

    def both(self, **env: object) -> Chain:
        self.link("make", **env)
        self.link("use", **env)
        return self

    def verify(self, owner: PublicKey | None = None):
        report = verify_chain(
            layout_path=self.layout,
            link_dir=self.links,
            owner=owner or self.owner.public,
            disk=DiskArtifacts(self.root),
        )
        verify_inspections(report, self.root)  # as verify_run does for a run
        return report

    def fails(self, owner: PublicKey | None = None) -> VerificationError:
        with pytest.raises(VerificationError) as info:
            self.verify(owner)
        return info.value


def test_a_sound_chain_passes_every_check_in_order(tmp_path: Path) -> None:
    report = Chain(tmp_path).both().verify()
    names = [c for c, _ in report.checks]
    assert names == [
        "layout signature",
        "layout expiry",
        "links present",
        "link signatures",
        "expected command",
        "run binding",
        "return values",
        "artifact rules",
        "artifacts on disk",
    ]
    assert report.run_id == "run-1" and report.pins == PINS


def test_layout_signature(tmp_path: Path) -> None:
    chain = Chain(tmp_path).both()
    assert chain.fails(keypair("x").public).check == "layout signature"


def test_layout_expiry(tmp_path: Path) -> None:
    err = Chain(tmp_path, expires_days=-1).both().fails()
    assert err.check == "layout expiry" and "release renew" in (err.hint or "")


def test_links_present(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.link("make")
    err = chain.fails()
    assert (err.check, err.step) == ("links present", "use")


def test_link_signatures(tmp_path: Path) -> None:
    chain = Chain(tmp_path).both()
    (link,) = chain.links.glob("use.*.link")
    env = json.loads(link.read_text())
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["products"]["use/model.bin"]["sha256"] = "0" * 64  # one changed digest
    env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    link.write_text(json.dumps(env))
    err = chain.fails()
    assert (err.check, err.step) == ("link signatures", "use")


def test_expected_command(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.link("make", command=["python", "-c", "import os; os.system('evil')"])
    chain.link("use")
    err = chain.fails()
    assert (err.check, err.step) == ("expected command", "make")


def test_run_binding(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.link("make")
    chain.link("use", run_id="run-2")  # spliced in from another run
    err = chain.fails()
    assert err.check == "run binding" and "different runs" in err.message


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("config_sha256", "0" * 64, "config pin"),
        ("code", {"sha256": "0" * 64}, "code pin"),
        ("lock_sha256", "0" * 64, "lock pin"),
    ],
)
def test_pins(tmp_path: Path, field: str, value: object, check: str) -> None:
    err = Chain(tmp_path).both(**{field: value}).fails()
    assert err.check == check


def test_return_values(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.link("make", rc=1)
    chain.link("use")
    assert chain.fails().check == "return values"


def test_artifact_rules_name_the_upstream_product_a_material_no_longer_matches(tmp_path):
    chain = Chain(tmp_path)
    chain.link("make")
    (chain.root / "make" / "data.bin").write_bytes(b"poisoned data")  # swapped between steps
    chain.link("use")
    err = chain.fails()
    assert (err.check, err.step) == ("artifact rules", "use")
    assert "make/data.bin" in err.message and "but step 'make' produced" in err.message


def test_artifacts_on_disk(tmp_path: Path) -> None:
    chain = Chain(tmp_path).both()
    (chain.root / "use" / "model.bin").write_bytes(b"weights, changed")
    err = chain.fails()
    assert err.check == "artifacts on disk" and err.artifact.endswith("use/model.bin")


def test_a_recorded_name_that_leaves_the_tree_is_refused(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.link("make")
    write_link(
        chain.links,
        name="use",
        materials=hash_tree(chain.root / "make", prefix="make/"),
        products={"use/../../outside.bin": {"sha256": "0" * 64}},
        command=CMD["use"],
        byproducts={"return-value": 0},
        environment=chain.env(),
        signer=chain.functionary.signer,
    )
    with pytest.raises(VerificationError) as info:
        verify_chain(
            layout_path=chain.layout,
            link_dir=chain.links,
            owner=chain.owner.public,
            disk=DiskArtifacts(chain.root),
        )
    assert "not a plain relative path" in info.value.message or info.value.check == "artifact rules"


RUN_RULES = [
    ["MATCH", "make/*", "WITH", "PRODUCTS", "FROM", "make"],
    ["DISALLOW", "make/*"],
    ["MATCH", "use/*", "WITH", "PRODUCTS", "FROM", "use"],
    ["DISALLOW", "use/*"],
    ["ALLOW", "run.json"],
    ["DISALLOW", "*"],
]


def inspection(run: list[str] | None = None, name: str = INSPECTION_NAME) -> Inspection:
    return Inspection(
        name=name,
        run=run or list(INSPECTION_COMMAND),
        expected_materials=RUN_RULES,
        expected_products=RUN_RULES,
    )


def test_the_inspection_passes_a_sound_run_and_ignores_in_toto_verify_s_own_link(tmp_path):
    chain = Chain(tmp_path, inspect=[inspection()]).both()
    (chain.root / "run.json").write_text("{}")
    (chain.root / f"{INSPECTION_NAME}.link").write_text("{}")  # what in-toto-verify leaves
    report = chain.verify()
    assert [c for c, _ in report.checks][-2:] == ["artifacts on disk", "inspections"]


def test_the_inspection_refuses_an_unattested_file_in_a_step_directory(tmp_path):
    chain = Chain(tmp_path, inspect=[inspection()]).both()
    (chain.root / "use" / "extra.pkl").write_bytes(b"not signed by any step")
    err = chain.fails()
    assert err.check == "inspections" and "use/extra.pkl" in err.message
    assert "added or changed after its step signed" in (err.hint or "")


def test_the_inspection_refuses_a_file_no_rule_allows(tmp_path):
    chain = Chain(tmp_path, inspect=[inspection()]).both()
    (chain.root / "stray.txt").write_text("?")
    err = chain.fails()
    assert err.check == "inspections" and "stray.txt" in err.message


def test_a_layout_inspection_chainproof_did_not_write_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    chain = Chain(tmp_path, inspect=[inspection(run=["touch", str(marker)])]).both()
    err = chain.fails()
    assert err.check == "inspections" and "touch" in err.message
    assert not marker.exists()
    renamed = Chain(tmp_path / "b", inspect=[inspection(name="other")]).both()
    assert renamed.fails().check == "inspections"


def test_a_bundle_is_not_judged_by_the_run_inspection(tmp_path):
    chain = Chain(tmp_path, inspect=[inspection()]).both()
    (chain.root / "make" / "data.bin").unlink()  # a bundle carries only the released steps
    report = verify_chain(
        layout_path=chain.layout,
        link_dir=chain.links,
        owner=chain.owner.public,
        disk=DiskArtifacts(chain.root, require_all=False, required_steps=("use",)),
    )
    assert "inspections" not in [c for c, _ in report.checks]


def test_malformed_inspection_rules_are_a_verification_failure_not_a_crash(tmp_path):
    bad = Inspection(
        name=INSPECTION_NAME,
        run=list(INSPECTION_COMMAND),
        expected_materials=[["MATCH", "x/*", "WITH", "PRODUCTS", "FROM", "no-such-step"]],
        expected_products=[["DISALLOW", "*"]],
    )
    chain = Chain(tmp_path, inspect=[bad]).both()
    assert chain.fails().check == "inspections"


def test_a_file_changed_after_a_verify_in_the_same_process_is_caught(tmp_path: Path) -> None:
    # digests are cached by (device, inode, size, mtime_ns, ctime_ns): a rewrite that keeps
    # the size and restores the mtime still changes ctime, so the second verify re-reads it
    chain = Chain(tmp_path).both()
    chain.verify()
    model = chain.root / "use" / "model.bin"
    before = model.stat()
    model.write_bytes(b"WEIGHTS")  # same size
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    err = chain.fails()
    assert err.check == "artifacts on disk" and err.artifact.endswith("use/model.bin")


def test_a_recorded_file_replaced_by_a_symlink_is_refused_as_before(tmp_path: Path) -> None:
    from pipeline.release.verify import refuse_symlinks

    chain = Chain(tmp_path).both()
    model = chain.root / "use" / "model.bin"
    (tmp_path / "elsewhere.bin").write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(tmp_path / "elsewhere.bin")
    disk = DiskArtifacts(chain.root)
    verify_chain(
        layout_path=chain.layout, link_dir=chain.links, owner=chain.owner.public, disk=disk
    )  # the chain check follows it and its bytes match, as in-toto's would
    with pytest.raises(VerificationError) as info:
        refuse_symlinks(chain.root, disk.tree)  # the walk the chain check took
    assert info.value.check == "layout of files"
    assert info.value.message == "use/model.bin is a symlink; a verified tree holds only real files"


def test_a_bundle_tree_is_walked_once_for_every_check(tmp_path: Path, monkeypatch) -> None:
    from pipeline import hashing
    from pipeline.release import verify

    chain = Chain(tmp_path).both()
    walks: list[Path] = []
    real = hashing.walk_tree

    def counting(root: Path, **kw: bool) -> hashing.Walk:
        walks.append(root)
        return real(root, **kw)

    monkeypatch.setattr(verify, "walk_tree", counting)
    monkeypatch.setattr("pipeline.provenance.chain.walk_tree", counting)
    tree = verify.refuse_symlinks(chain.root)
    disk = DiskArtifacts(chain.root, walked=tree)
    report = verify_chain(
        layout_path=chain.layout, link_dir=chain.links, owner=chain.owner.public, disk=disk
    )
    verify.refuse_unattested(chain.root, report, tree)
    assert walks == [chain.root]
    (chain.root / "use" / "stray.bin").write_bytes(b"not recorded")
    with pytest.raises(VerificationError) as info:
        verify.refuse_unattested(chain.root, report)
    assert "use/stray.bin is in step 'use' but its link does not record it" in info.value.message


def test_special_files_are_not_artifacts(tmp_path: Path) -> None:
    chain = Chain(tmp_path).both()
    os.mkfifo(chain.root / "use" / "pipe")  # an unrecorded FIFO is not read (it would block)
    walk = hashing_walk(chain.root)
    assert "use/pipe" in walk.others and "use/pipe" not in walk.files
    chain.verify()
    os.unlink(chain.root / "use" / "model.bin")
    os.mkfifo(chain.root / "use" / "model.bin")  # a recorded file that is now a FIFO
    err = chain.fails()
    assert err.check == "artifacts on disk" and "is missing on disk" in err.message


def hashing_walk(root: Path):
    from pipeline.hashing import walk_tree

    return walk_tree(root)
