"""verify on a distributed step: every pinned worker in the link, exited 0, in the step's lock,
its logs on disk the ones signed. Each tamper is a named failure, never a crash."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import VerificationError
from pipeline.hashing import hash_tree
from pipeline.provenance.links import write_link
from tests.unit.provenance.test_chain import CMD, PINS, Chain

LOCK = PINS.locks["main.txt"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DistChain(Chain):
    """`use` is the distributed step, with `workers` workers and their logs on disk."""

    def __init__(self, root: Path, *, workers: int = 2, pinned: dict[str, int] | None = None):
        pins = replace(PINS, workers={"use": workers} if pinned is None else pinned)
        super().__init__(root, pins=pins)
        (self.root / "logs").mkdir()
        self.n = workers
        for i in range(workers):
            for which in ("stdout", "stderr"):
                suffix = "" if i == 0 else f".worker-{i}"
                (self.root / "logs" / f"use{suffix}.{which}").write_text(f"worker {i} {which}\n")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.n):
            suffix = "" if i == 0 else f".worker-{i}"
            rec: dict[str, Any] = {
                "index": i,
                "address": f"127.0.0.1:{23456 + i}",
                "return-value": 0,
                "environment": {"lock_sha256": LOCK},
            }
            for which in ("stdout", "stderr"):
                name = f"logs/use{suffix}.{which}"
                rec[which] = {"path": name, "sha256": sha(self.root / name)}
            out.append(rec)
        return out

    def write(self, records: Any = None, **byproducts: Any) -> DistChain:
        self.link("make")
        recs = self.records() if records is None else records
        chief = self.records()[0] if self.n else {}
        write_link(
            self.links,
            name="use",
            materials=hash_tree(self.root / "make", prefix="make/"),
            products=hash_tree(self.root / "use", prefix="use/"),
            command=CMD["use"],
            byproducts={
                "return-value": 0,
                **{w: chief[w] for w in ("stdout", "stderr") if w in chief},
                "workers": recs,
                **byproducts,
            },
            environment=self.env(),
            signer=self.functionary.signer,
        )
        return self


def fails(chain: Chain) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        chain.verify()
    assert info.value.check == "workers"
    return info.value


def test_every_pinned_worker_checked(tmp_path: Path) -> None:
    report = DistChain(tmp_path).write().verify()
    checks = dict(report.checks)
    assert "2 worker(s) pinned by the layout" in checks["workers"]


def test_a_missing_worker_record(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    err = fails(chain.write(chain.records()[:1]))
    assert err.step == "use" and "records 1 worker(s); the layout pins 2" in err.message


def test_workers_the_layout_does_not_pin(tmp_path: Path) -> None:
    err = fails(DistChain(tmp_path, pinned={}).write())
    assert "the layout pins none" in err.message


def test_a_pinned_step_without_workers(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    chain.both()
    assert "records no worker(s); the layout pins 2" in fails(chain).message


def test_a_worker_that_failed(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    recs = chain.records()
    recs[1]["return-value"] = -9
    assert "worker 1 recorded return value -9" in fails(chain.write(recs)).message


def test_a_worker_in_another_environment(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    recs = chain.records()
    recs[1]["environment"]["lock_sha256"] = "0" * 64
    err = fails(chain.write(recs))
    assert "worker 1 ran with lock_sha256 0000" in err.message


def test_duplicate_indices(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    recs = chain.records()
    recs[1]["index"] = 0
    assert "are not 0..1 once each" in fails(chain.write(recs)).message


def test_a_worker_log_changed_on_disk(tmp_path: Path) -> None:
    chain = DistChain(tmp_path).write()
    (chain.root / "logs/use.worker-1.stdout").write_text("rewritten\n")
    err = fails(chain)
    assert "logs/use.worker-1.stdout (worker 1 of step 'use')" in err.message


@pytest.mark.parametrize(
    "records",
    ["two", [1, 2], [{"index": "0"}, {"index": 1}], None],
    ids=["string", "ints", "bad-index", "null"],
)
def test_malformed_records_are_named_failures(tmp_path: Path, records: Any) -> None:
    chain = DistChain(tmp_path)
    chain.write(records if records is not None else [])
    fails(chain)


def test_a_log_path_outside_the_run(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    recs = chain.records()
    recs[1]["stdout"]["path"] = "logs/../../../etc/passwd"
    assert "no valid stdout log digest" in fails(chain.write(recs)).message


def with_metrics(chain: DistChain) -> list[dict[str, Any]]:
    recs = chain.records()
    for r in recs:
        name = f"logs/use.worker-{r['index']}.system-metrics.json"
        (chain.root / name).write_text('{"samples": []}\n')
        r["system-metrics"] = {"path": name, "sha256": sha(chain.root / name)}
    return recs


def test_system_metrics_files_are_checked_like_logs(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    chain.write(with_metrics(chain)).verify()
    (chain.root / "logs/use.worker-1.system-metrics.json").write_text('{"samples": [1]}\n')
    err = fails(chain)
    assert "logs/use.worker-1.system-metrics.json (worker 1 of step 'use')" in err.message


def test_a_system_metrics_path_outside_the_logs(tmp_path: Path) -> None:
    chain = DistChain(tmp_path)
    recs = with_metrics(chain)
    recs[0]["system-metrics"]["path"] = "use/model.keras"
    assert "no valid system-metrics" in fails(chain.write(recs)).message
