"""Hand-made runs and release bundles for the comparison tests.

Each side is written the way the runner writes it (real DSSE-signed links and scan Statements,
from a throwaway ed25519 key) but with tiny files in place of TensorFlow's: no stage runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.provenance.links import write_link
from pipeline.provenance.statements import statement, write_signed_statement
from pipeline.runner.gates import VULNS_PREDICATE

MAIN_IN = "requirements/main.in"
LOCK_A = f"""\
certifi==2024.2.2
    # via requests
click==8.1.0
    # via -r {MAIN_IN}
requests==2.31.0
    # via -r {MAIN_IN}
six==1.16.0
    # via -r {MAIN_IN}
urllib3==1.26.0
    # via requests
"""
# click up, six down, requests up (direct); urllib3 gone, idna new (both via requests).
LOCK_B = f"""\
certifi==2024.2.2
    # via requests
click==8.2.0
    # via -r {MAIN_IN}
idna==3.7
    # via requests
requests==2.32.0
    # via -r {MAIN_IN}
six==1.15.0
    # via -r {MAIN_IN}
"""
DATASET = b"the dataset bytes"
PER_CLASS = {
    "0": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10},
    "1": {"precision": 0.8, "recall": 1.0, "f1": 0.889, "support": 8},
}
TRAIN_PARAMS = {"learning_rate": 0.001, "epochs": 5, "optimizer": "adam", "layers": [{"units": 8}]}
ENV = {
    "python": "3.11.7",
    "implementation": "cpython",
    "platform": "Linux-6.1-x86_64-with-glibc2.36",
    "machine": "x86_64",
    "lock": "main.txt",
    "distributions_sha256": "e" * 64,
    "stage_environment": "pipeline lock",
}
STAGES = (
    ("source", "source", ()),
    ("train", "train", ("source",)),
    ("package", "package", ("train",)),
)
DB_SHA = "d" * 64


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def side(**changes: Any) -> dict[str, Any]:
    """What one hand-made run or bundle records; keyword arguments replace the defaults."""
    base = {
        "lock": LOCK_A,
        "train_params": TRAIN_PARAMS,
        "accuracy": 0.9,
        "loss": 0.3,
        "per_class": PER_CLASS,
        "env": {},  # stage -> environment overrides ("*": every stage)
        "framework": {"tensorflow": "2.21.0", "keras": "3.15.1"},
        "findings": [],  # None: the Statement says "not scanned"
        "db": DB_SHA,
        "timeout": 600,
        "ship_lock": True,  # False: an older release without locks/
    }
    unknown = set(changes) - set(base)
    assert not unknown, unknown
    return copy.deepcopy({**base, **changes})


def _files(s: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    """The config text and every stage product, by run-relative name."""
    config = yaml.safe_dump(
        {
            "schema": 1,
            "name": "digits",
            "lock": "../main.txt",
            "stages": [
                {"name": n, "kind": k, "needs": list(up), "timeout": s["timeout"]}
                | ({"params": s["train_params"]} if k == "train" else {})
                for n, k, up in STAGES
            ],
        },
        sort_keys=True,
    )
    metrics = {
        "dataset": {
            "name": "digits",
            "sha256": sha(DATASET),
            "source": {"location": "sklearn", "sha256": "f" * 64},
            "split": {"train": 80, "test": 20, "test_fraction": 0.2, "seed": 42},
        },
        "framework": s["framework"],
        "model": {"layers": ["Dense"], "parameters": 650},
        "params": s["train_params"],
        "test": {"accuracy": s["accuracy"], "loss": s["loss"], "per_class": s["per_class"]},
    }
    metrics_bytes = json.dumps(metrics, sort_keys=True).encode()
    model = json.dumps(["weights", s["train_params"], s["accuracy"]]).encode()
    files = {
        "source/dataset.npz": DATASET,
        "source/manifest.json": b"{}",
        "train/model.keras": model,
        "train/metrics.json": metrics_bytes,
        "package/model.keras": model,
        "package/metrics.json": metrics_bytes,
        "package/model_card.json": json.dumps({"training_data": metrics["dataset"]}).encode(),
    }
    return config, files


def _links(
    directory: Path, s: dict[str, Any], config: str, files: dict[str, bytes], signer
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    digest = lambda names: {n: {"sha256": sha(files[n])} for n in names}  # noqa: E731
    for name, kind, up in STAGES:
        env = {**ENV, "lock_sha256": sha(s["lock"]), "config_sha256": sha(config)}
        env.update(s["env"].get("*", {}))
        env.update(s["env"].get(name, {}))
        write_link(
            directory,
            name=name,
            materials={
                f"specs/{name}.json": {"sha256": "0" * 64},
                **digest(f for f in files if f.split("/")[0] in up),
            },
            products=digest(f for f in files if f.startswith(f"{name}/")),
            command=["python", "-I", "-m", f"stages.{kind}", f"../specs/{name}.json"],
            byproducts={"return-value": 0},
            environment=env,
            signer=signer,
        )


def _scan_statement(path: Path, s: dict[str, Any], signer) -> None:
    if s["findings"] is None:
        cp = {"scanned": False, "verdict": "not scanned", "reason": "no database at x.sqlite"}
    else:
        lock = {"lock": "main.txt", "sha256": sha(s["lock"]), "findings": s["findings"]}
        cp = {"scanned": True, "verdict": "pass", "database": {"sha256": s["db"]}, "locks": [lock]}
    path.parent.mkdir(parents=True, exist_ok=True)
    stmt = statement({"main.txt": sha(s["lock"])}, VULNS_PREDICATE, {"chainproof": cp})
    write_signed_statement(path, stmt, signer)


def make_run(ws: Path, run_id: str, s: dict[str, Any], signer) -> Path:
    """`<ws>/runs/<id>` with its links in `<ws>/attestations/runs/<id>`, as the runner lays out."""
    run_dir, links = ws / "runs" / run_id, ws / "attestations" / "runs" / run_id
    config, files = _files(s)
    for name, data in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    (run_dir / "specs").mkdir()
    for name, kind, _ in STAGES:
        params = s["train_params"] if kind == "train" else {"seed": 42}
        (run_dir / "specs" / f"{name}.json").write_text(
            json.dumps({"kind": kind, "params": params})
        )
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "locks").mkdir()
    (run_dir / "locks" / "main.txt").write_text(s["lock"])
    _scan_statement(run_dir / "checks" / "dependencies.intoto.json", s, signer)
    _links(links, s, config, files, signer)
    record = {
        "run_id": run_id,
        "pipeline": "digits",
        "config_sha256": sha(config),
        "links": os.path.relpath(links, run_dir),
        "layout": os.path.relpath(links / "root.layout", run_dir),
        "stages": [n for n, _, _ in STAGES],
        "source_commit": "c0ffee",
        "status": "succeeded",
    }
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def make_bundle(ws: Path, version: str, s: dict[str, Any], signer) -> Path:
    """`<ws>/releases/digits/<version>`: the last stage's products and the whole chain."""
    bundle = ws / "releases" / "digits" / version
    config, files = _files(s)
    for name, data in files.items():
        if name.startswith("package/"):
            (bundle / "artifacts" / name).parent.mkdir(parents=True, exist_ok=True)
            (bundle / "artifacts" / name).write_bytes(data)
    _links(bundle / "attestations", s, config, files, signer)
    (bundle / "attestations" / "root.layout").write_text("{}")  # read by verify, not by diff
    _scan_statement(bundle / "attestations" / "checks" / "dependencies.intoto.json", s, signer)
    if s["ship_lock"]:
        (bundle / "locks").mkdir()
        (bundle / "locks" / "main.txt").write_text(s["lock"])
    return bundle


def finding(id_: str, package: str, version: str, *aliases: str, via: str = "") -> dict:
    path = f"{package} {version}" + (f" <- {via}" if via else "") + f" <- {MAIN_IN}"
    return {
        "id": id_,
        "aliases": list(aliases),
        "package": package,
        "version": version,
        "severity": "high",
        "paths": [path],
    }


def osv_store(directory: Path, fixes: dict[str, tuple[str, str]]) -> Path:
    """An OSV store (as `vulndb import` writes it) with one record per id: (package, fixed)."""
    from pipeline.scan.vulndb import import_osv

    osv = directory / "osv-records"
    osv.mkdir(parents=True)
    for id_, (pkg, fixed) in fixes.items():
        record = {
            "id": id_,
            "modified": "2024-01-01T00:00:00Z",
            "affected": [
                {
                    "package": {"ecosystem": "PyPI", "name": pkg},
                    "ranges": [
                        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                    ],
                }
            ],
        }
        (osv / f"{id_}.json").write_text(json.dumps(record))
    store = directory / ".chainproof" / "vulndb.sqlite"
    store.parent.mkdir(parents=True, exist_ok=True)
    import_osv(osv, store)
    return store
