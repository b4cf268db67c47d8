"""Verified reuse: an earlier link stands in for a stage only on proof, and every forgery,
swap and change an attacker who read runner/reuse.py would try is refused with its reason."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from pipeline.codedigest import CodeManifest
from pipeline.config import PipelineConfig, StageConfig, load_config
from pipeline.provenance.keys import KeyPair, init_dev_keys, load_signer
from pipeline.provenance.layout import stage_command
from pipeline.provenance.links import link_filename, write_link
from pipeline.runner import reuse
from pipeline.runner.reuse import Expected, StageReuse, earlier_runs
from pipeline.workspace import Workspace, spec_name
from tests.conftest import FAST_PIPELINE, write_config

LOCK = "1" * 64
CODE = CodeManifest(MappingProxyType({"pipeline/runner/run.py": "a" * 64}), "c" * 64)
OLD, OLDER, NEW = "20261201T100000Z-aaaaaa", "20261201T090000Z-bbbbbb", "20261202T100000Z-cccccc"
PRODUCTS = {"dataset.npz": b"x" * 4096, "manifest.json": b'{"rows": 10}'}
SANDBOX = {"tool": "bubblewrap", "version": "0.8.0", "network": False}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[KeyPair, KeyPair]:
    """Ours (the functionary the layout names) and another workspace's."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    init_dev_keys(ours, roles=("functionary",))
    init_dev_keys(theirs, roles=("functionary",))
    return load_signer("functionary", ours), load_signer("functionary", theirs)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> PipelineConfig:
    return load_config(write_config(tmp_path_factory.mktemp("cfg"), FAST_PIPELINE))


def spec(ws: Workspace, run_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A spec as the runner writes it: it names its run and the run's paths."""
    return {
        "run_id": run_id,
        "stage": "source",
        "kind": "source",
        "params": params or {"dataset": "sklearn-digits", "seed": 7},
        "inputs": {},
        "outputs": ["dataset.npz", "manifest.json"],
        "extra": {"config_dir": str(ws.root / "configs"), "run_dir": str(ws.runs / run_id)},
    }


def earlier(
    ws: Workspace,
    signer: KeyPair,
    run_id: str,
    stage: StageConfig,
    *,
    params: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    command: list[str] | None = None,
    name: str | None = None,
) -> Path:
    """What a finished run leaves for one stage: spec, products, logs and its signed link."""
    run_dir = ws.runs / run_id
    spec_path = run_dir / spec_name(stage.name)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec(ws, run_id, params), indent=2, sort_keys=True))
    for file, data in PRODUCTS.items():
        (run_dir / stage.name).mkdir(parents=True, exist_ok=True)
        (run_dir / stage.name / file).write_bytes(data)
    (run_dir / "logs").mkdir(exist_ok=True)
    logs = {}
    for which in ("stdout", "stderr"):
        log = run_dir / "logs" / f"{stage.name}.{which}"
        log.write_text(f"{which} of {run_id}\n")
        logs[which] = {"path": f"logs/{log.name}", "sha256": _sha(log.read_bytes())}
    ws.links(run_id).mkdir(parents=True, exist_ok=True)
    return write_link(
        ws.links(run_id),
        name=name or stage.name,
        materials={
            spec_name(stage.name): {"sha256": _sha(spec_path.read_bytes())},
            "locks/main.txt": {"sha256": LOCK},
        },
        products={f"{stage.name}/{f}": {"sha256": _sha(d)} for f, d in PRODUCTS.items()},
        command=command or stage_command(stage.impl.module, stage.name),
        byproducts={"return-value": 0, **logs, "duration_ms": 1200},
        environment={
            "run_id": run_id,
            "config_sha256": "9" * 64,
            "lock_sha256": LOCK,
            "sandbox": SANDBOX,
            "code": {"sha256": CODE.sha256, "manifest": dict(CODE.files)},
            **(env or {}),
        },
        signer=signer.signer,
    )


def expected(ws: Workspace, stage: StageConfig, **kw: Any) -> Expected:
    return Expected(
        stage=stage,
        spec=spec(ws, NEW, kw.pop("params", None)),
        materials=kw.pop("materials", {"locks/main.txt": {"sha256": LOCK}}),
        lock_sha256=kw.pop("lock_sha256", LOCK),
        sandbox=kw.pop("sandbox", SANDBOX),
        **kw,
    )


def finder(ws: Workspace, keys, *, code: CodeManifest = CODE) -> StageReuse:
    return StageReuse(ws, run_id=NEW, key=keys[0].public, code=code)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def source(config: PipelineConfig) -> StageConfig:
    return config.stage("source")


def test_an_unchanged_stage_is_reused_and_its_products_placed_in_the_new_run(ws, keys, config):
    link = earlier(ws, keys[0], OLD, source(config))
    target = ws.runs / NEW / "source"
    target.mkdir(parents=True)
    verdict = finder(ws, keys).find(expected(ws, source(config)), adopt_into=target.parent)
    assert verdict.reusable and verdict.earlier is not None
    assert verdict.earlier.run_id == OLD and verdict.earlier.link_path == link
    assert verdict.earlier.record(ws.root)["link"] == f"attestations/runs/{OLD}/{link.name}"
    for file, data in PRODUCTS.items():
        assert (target / file).read_bytes() == data
        assert not (target / file).is_symlink()
        # a copy this process owns, never a hard link another writer of the old file shares
        assert os.stat(target / file).st_ino != os.stat(ws.runs / OLD / "source" / file).st_ino
        assert os.stat(target / file).st_nlink == 1
    # and the logs its link names, so the new run's chain holds on its own
    assert (ws.runs / NEW / "logs" / "source.stdout").read_text() == f"stdout of {OLD}\n"


def test_a_product_swapped_after_signing_with_the_same_size_and_mtime_is_never_reused(
    ws, keys, config
):
    earlier(ws, keys[0], OLD, source(config))
    product = ws.runs / OLD / "source" / "dataset.npz"
    st = product.stat()
    data = bytearray(product.read_bytes())
    data[100] ^= 0x01
    product.write_bytes(bytes(data))
    os.utime(product, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as signed
    target = ws.runs / NEW / "source"
    target.mkdir(parents=True)
    verdict = finder(ws, keys).find(expected(ws, source(config)), adopt_into=target.parent)
    assert not verdict.reusable
    assert verdict.reason is not None and verdict.reason.kind == reuse.PRODUCT
    assert "source/dataset.npz was changed after it was signed" in verdict.reason.detail
    assert verdict.reason.run_id == OLD
    assert list(target.iterdir()) == [], "nothing of the refused run is left to be signed"
    assert not (ws.runs / NEW / "logs" / "source.stdout").exists()
    # status (no adoption) says the same
    assert finder(ws, keys).find(expected(ws, source(config))).reason.kind == reuse.PRODUCT


def test_a_symlink_among_the_products_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    product = ws.runs / OLD / "source" / "manifest.json"
    elsewhere = ws.root / "same-bytes.json"
    elsewhere.write_bytes(product.read_bytes())
    product.unlink()
    product.symlink_to(elsewhere)  # the same bytes, but not a file of the run
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason is not None and verdict.reason.kind == reuse.PRODUCT
    assert "symlink" in verdict.reason.detail


def test_a_stage_directory_that_is_a_symlink_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    stage_dir = ws.runs / OLD / "source"
    moved = ws.root / "outside"
    stage_dir.rename(moved)
    stage_dir.symlink_to(moved)  # the same files, reached through a link out of the run
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.PRODUCT and "symlink" in verdict.reason.detail


def test_an_unsigned_file_added_to_the_stage_directory_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    (ws.runs / OLD / "source" / "extra.py").write_text("import os\n")
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason is not None and verdict.reason.kind == reuse.PRODUCT
    assert "source/extra.py unsigned" in verdict.reason.detail


def test_a_link_signed_by_a_key_the_layout_does_not_name_is_not_reused(ws, keys, config):
    forged = earlier(ws, keys[1], OLD, source(config))  # another workspace's functionary
    ours = ws.links(OLD) / link_filename("source", keys[0].public.keyid)
    forged.rename(ours)  # under the name our key's link would have
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason is not None and verdict.reason.kind == reuse.SIGNATURE
    assert keys[0].public.keyid[:16] in verdict.reason.detail


def test_an_unsigned_or_edited_link_is_not_reused(ws, keys, config):
    link = earlier(ws, keys[0], OLD, source(config))
    envelope = json.loads(link.read_text())
    envelope["signatures"] = []
    link.write_text(json.dumps(envelope))
    assert finder(ws, keys).find(expected(ws, source(config))).reason.kind == reuse.SIGNATURE
    link.write_text("{not json")
    assert finder(ws, keys).find(expected(ws, source(config))).reason.kind == reuse.SIGNATURE


def test_a_link_copied_from_another_stage_or_run_is_not_reused(ws, keys, config):
    # a validly signed link of another step, placed under this step's name
    other = earlier(ws, keys[0], OLD, source(config), name="train")
    other.rename(ws.links(OLD) / link_filename("source", keys[0].public.keyid))
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.NOT_THIS_STEP and "'train'" in verdict.reason.detail
    # a validly signed link of this step, from another run, placed in this run's links
    earlier(ws, keys[0], OLD, source(config), env={"run_id": OLDER})
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.NOT_THIS_STEP and OLDER in verdict.reason.detail


def test_a_run_copied_from_another_workspace_is_not_reused(ws, keys, config, tmp_path):
    other = Workspace(tmp_path / "other")
    earlier(other, keys[0], OLD, source(config))  # same key, other paths
    (ws.runs).mkdir(parents=True)
    os.rename(other.runs / OLD, ws.runs / OLD)
    ws.links(OLD).parent.mkdir(parents=True)
    os.rename(other.links(OLD), ws.links(OLD))
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.SPEC
    assert "extra.config_dir" in verdict.reason.detail


@pytest.mark.parametrize(
    ("change", "kind", "words"),
    [
        ({"params": {"dataset": "sklearn-digits", "seed": 8}}, reuse.SPEC, "params.seed: 7 then"),
        ({"lock_sha256": "2" * 64}, reuse.LOCK, "the lock is 222222222222"),
        (
            {"materials": {"locks/main.txt": {"sha256": "3" * 64}}},
            reuse.LOCK,
            "locks/main.txt: sha256 333333333333",
        ),
        (
            {
                "materials": {
                    "locks/main.txt": {"sha256": LOCK},
                    "train/model.keras": {"sha256": "4" * 64},
                }
            },
            reuse.MATERIAL,
            "train/model.keras is new",
        ),
        ({"sandbox": "none"}, reuse.SANDBOX, "'none'"),
    ],
)
def test_a_changed_input_is_not_reused_and_named(ws, keys, config, change, kind, words):
    earlier(ws, keys[0], OLD, source(config))
    verdict = finder(ws, keys).find(expected(ws, source(config), **change))
    assert verdict.reason is not None and verdict.reason.kind == kind, verdict.reason
    assert words in verdict.reason.detail


def test_a_stage_code_change_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    edited = CodeManifest(MappingProxyType({"pipeline/runner/run.py": "b" * 64}), "d" * 64)
    verdict = finder(ws, keys, code=edited).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.CODE
    assert "pipeline/runner/run.py" in verdict.reason.detail


def test_another_command_or_a_failed_step_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config), command=["python", "-c", "evil"])
    assert finder(ws, keys).find(expected(ws, source(config))).reason.kind == reuse.COMMAND


def test_a_spec_rewritten_to_look_like_the_new_one_is_not_reused(ws, keys, config):
    # the earlier run had other params; its spec file is rewritten to match what runs now
    earlier(ws, keys[0], OLD, source(config), params={"dataset": "sklearn-digits", "seed": 99})
    (ws.runs / OLD / spec_name("source")).write_text(json.dumps(spec(ws, OLD), sort_keys=True))
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reason.kind == reuse.SPEC
    assert "not the one its link signed" in verdict.reason.detail


def test_a_tampered_log_is_not_reused(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    (ws.runs / OLD / "logs" / "source.stderr").write_text("rewritten\n")
    assert finder(ws, keys).find(expected(ws, source(config))).reason.kind == reuse.LOG


def test_a_tampered_newest_run_falls_back_to_an_intact_older_one(ws, keys, config):
    earlier(ws, keys[0], OLDER, source(config))
    earlier(ws, keys[0], OLD, source(config))
    (ws.runs / OLD / "source" / "manifest.json").write_bytes(b'{"rows": 11}')
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.earlier is not None and verdict.earlier.run_id == OLDER
    assert [r.kind for r in verdict.reasons] == [reuse.PRODUCT]


def test_a_publishing_stage_always_runs(ws, keys, config):
    verdict = finder(ws, keys).find(expected(ws, config.stage("deploy")))
    assert verdict.reason.kind == reuse.PUBLISHES


def test_only_run_directories_are_candidates(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    (ws.runs / "latest").symlink_to(OLD)
    (ws.runs / "notes").mkdir()
    assert earlier_runs(ws) == [OLD]
    assert earlier_runs(ws, exclude=OLD) == []
    assert finder(ws, keys).find(expected(ws, source(config))).reusable


def test_the_new_link_binds_to_the_new_run_and_says_where_it_came_from(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    found = finder(ws, keys).find(expected(ws, source(config))).earlier
    assert found is not None
    byproducts, env = finder(ws, keys).link_fields(
        found, environment={"run_id": NEW, "config_sha256": "8" * 64}
    )
    assert env["run_id"] == NEW and env["config_sha256"] == "8" * 64
    assert env["lock_sha256"] == LOCK and env["sandbox"] == SANDBOX
    assert env["reused"]["run_id"] == OLD
    assert env["reused"]["link_sha256"] == _sha(found.link_path.read_bytes())
    assert byproducts["return-value"] == 0 and byproducts["stdout"]["path"] == "logs/source.stdout"


def test_empty_or_failed_run_directories_cannot_crowd_out_a_reusable_run(ws, keys, config):
    earlier(ws, keys[0], OLD, source(config))
    for i in range(reuse.MAX_CANDIDATES + 5):  # newer than OLD, none with a link
        (ws.runs / f"20261201T11{i:04d}Z-dddddd").mkdir()
    verdict = finder(ws, keys).find(expected(ws, source(config)))
    assert verdict.reusable and verdict.earlier is not None and verdict.earlier.run_id == OLD


def test_an_unreadable_earlier_product_refuses_that_run_and_falls_back(ws, keys, config):
    earlier(ws, keys[0], OLDER, source(config))
    earlier(ws, keys[0], OLD, source(config))
    product = ws.runs / OLD / "source" / "manifest.json"
    product.unlink()
    os.mkfifo(product)  # not a regular file: never read (it would block), never placed
    verdict = finder(ws, keys).find(expected(ws, source(config)), adopt_into=ws.runs / NEW)
    assert verdict.earlier is not None and verdict.earlier.run_id == OLDER
    assert [r.kind for r in verdict.reasons] == [reuse.PRODUCT]
