"""SLSA provenance that outside tools can resolve: no builder paths, the remote, the dirty flag."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.provenance.keys import init_dev_keys, load_public_key, load_signer
from pipeline.release.publish import (
    ReleaseInputs,
    dataset_uri,
    portable_remote,
    repository_of,
    write_provenance,
)
from tests.conftest import ROOT

SMALL_LOCK = ROOT / "tests" / "data" / "locks" / "small.txt"


@pytest.mark.parametrize(
    ("remote", "want"),
    [
        ("https://github.com/org/repo.git", "git+https://github.com/org/repo.git"),
        ("https://user:ghp_secret@github.com/org/repo", "git+https://github.com/org/repo"),
        ("git@github.com:org/repo.git", "git+ssh://github.com/org/repo.git"),
        ("ssh://git@host.example:2222/org/repo", "git+ssh://host.example:2222/org/repo"),
        ("/srv/git/repo.git", None),
        ("file:///srv/git/repo.git", None),
        ("C:/repo", None),
        ("https://host:99999999/x", None),
    ],
)
def test_remotes_become_portable_urls_without_credentials(remote, want):
    assert portable_remote(remote) == want


def test_dataset_origin_uris():
    digits = {
        "kind": "package",
        "location": "scikit-learn 1.6.1: sklearn/datasets/data/digits.csv.gz",
    }
    assert dataset_uri(digits) == "pkg:pypi/scikit-learn@1.6.1#sklearn/datasets/data/digits.csv.gz"
    assert dataset_uri({"kind": "url", "location": "https://x.org/d.npz"}) == "https://x.org/d.npz"
    assert dataset_uri({"kind": "file", "location": "/home/me/d.npz"}) is None


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def make_inputs(tmp_path: Path, *, remote: str | None, dirty: bool) -> ReleaseInputs:
    repo = tmp_path / "builder-home" / "project"
    (repo / "configs").mkdir(parents=True)
    (repo / "requirements").mkdir()
    shutil.copyfile(SMALL_LOCK, repo / "requirements" / "small.txt")
    config_path = repo / "configs" / "p.yaml"
    config_path.write_text(
        "schema: 1\nname: p\nlock: ../requirements/small.txt\nstages:\n"
        "  - name: source\n    kind: source\n    params: {dataset: sklearn-digits}\n"
    )
    git(repo, "init", "-q")
    if remote:
        git(repo, "remote", "add", "origin", remote)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "x")
    if dirty:
        config_path.write_text(config_path.read_text() + "# edited\n")
    config = load_config(config_path)
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    run_dir, links_dir, keys = tmp_path / "run", tmp_path / "links", tmp_path / "keys"
    (run_dir / "source").mkdir(parents=True)
    links_dir.mkdir()
    init_dev_keys(keys)
    (run_dir / "source" / "manifest.json").write_text(
        json.dumps(
            {
                "name": "sklearn-digits",
                "source": {
                    "kind": "package",
                    "location": "scikit-learn 1.6.1: sklearn/datasets/data/digits.csv.gz",
                    "sha256": "34" * 32,
                },
                "split": {"seed": 42},
            }
        )
    )
    layout = links_dir / "root.layout"
    layout.write_text("{}")
    links = {
        "source": SimpleNamespace(
            products={"source/dataset.npz": {"sha256": "12" * 32}}, environment={}
        ),
        "package": SimpleNamespace(
            products={
                "package/model.keras": {"sha256": "ab" * 32},
                "package/saved_model/saved_model.pb": {"sha256": "cd" * 32},
            },
            environment={},
        ),
    }
    return ReleaseInputs(
        config=config,
        run_id="r1",
        run_dir=run_dir,
        links_dir=links_dir,
        layout_path=layout,
        locks={config.lock: "ef" * 32},
        links=links,  # type: ignore[arg-type]
        owner=load_public_key(keys / "owner.pub"),
        functionary=load_signer("functionary", keys),
        release_key=None,
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:01:00Z",
        source_commit=commit,
        code={"sha256": "99" * 32, "commit": commit, "dirty": dirty},
        layout_signed_by="runner",
        destination=tmp_path / "releases" / "p" / "1",
    )


def provenance(inp: ReleaseInputs) -> dict:
    env = json.loads(write_provenance(inp, ["package"]).read_text())
    return json.loads(base64.b64decode(env["payload"]))


def test_provenance_names_files_by_remote_and_relative_path(tmp_path):
    inp = make_inputs(tmp_path, remote="https://tok:x@git.example/org/project.git", dirty=False)
    stmt = provenance(inp)
    text = json.dumps(stmt)
    assert str(tmp_path) not in text and "file:" not in text and "tok" not in text
    build = stmt["predicate"]["buildDefinition"]
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    commit = inp.source_commit
    base = "git+https://git.example/org/project.git"
    assert deps["config"]["uri"] == f"{base}@{commit}#configs/p.yaml"
    assert deps["lock:small.txt"]["uri"] == f"{base}@{commit}#requirements/small.txt"
    assert deps["source"] == {
        "name": "source",
        "uri": f"{base}@{commit}",
        "digest": {"gitCommit": commit},
        "annotations": {"dirty": False},
    }
    data = deps["dataset:sklearn-digits"]
    assert data["uri"] == "pkg:pypi/scikit-learn@1.6.1#sklearn/datasets/data/digits.csv.gz"
    assert data["digest"] == {"sha256": "34" * 32}
    assert data["mediaType"] == "application/gzip"
    assert data["annotations"]["dataset_sha256"] == "12" * 32
    assert build["externalParameters"]["config"]["path"] == "configs/p.yaml"


def test_a_dirty_tree_without_remote_is_recorded_and_stays_relative(tmp_path):
    inp = make_inputs(tmp_path, remote=None, dirty=True)
    stmt = provenance(inp)
    assert str(tmp_path) not in json.dumps(stmt)
    deps = {d["name"]: d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert "uri" not in deps["config"] and deps["config"]["annotations"] == {
        "path": "configs/p.yaml"
    }
    assert deps["source"]["annotations"] == {"dirty": True}
    assert deps["code"]["annotations"]["dirty"] is True


def test_outside_a_repository_only_names_remain(tmp_path, monkeypatch):
    inp = make_inputs(tmp_path, remote=None, dirty=False)
    shutil.rmtree(inp.config.base_dir.parent / ".git")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert repository_of(inp.config.base_dir) is None
    stmt = provenance(inp)
    assert str(tmp_path) not in json.dumps(stmt)
    deps = {d["name"]: d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["lock:small.txt"]["annotations"] == {"path": "locks/small.txt"}


ITA_VENV = Path(os.environ.get("CHAINPROOF_ITA_VENV", "/tmp/chainproof-in-toto-attestation"))
PARSE = """
import json, sys
import google.protobuf.json_format as pbj
from in_toto_attestation.v1.statement import Statement
from in_toto_attestation.v1.statement_pb2 import Statement as StatementPB
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.predicates.provenance.v1.provenance_pb2 import Provenance
doc = json.load(sys.stdin)
stmt = pbj.ParseDict(doc, StatementPB())  # unknown fields are errors
Statement.copy_from_pb(stmt).validate()
prov = pbj.ParseDict(doc["predicate"], Provenance())
for rd in [*stmt.subject, *prov.build_definition.resolved_dependencies]:
    ResourceDescriptor.copy_from_pb(rd).validate()
print(len(prov.build_definition.resolved_dependencies), prov.run_details.builder.id)
"""


def ita_python() -> Path:
    """The in-toto-attestation SLSA v1 bindings in a throwaway venv (not in the lock)."""
    python = ITA_VENV / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(ITA_VENV)], check=True, timeout=120)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "in-toto-attestation"],
                check=True,
                timeout=300,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as e:
            shutil.rmtree(ITA_VENV, ignore_errors=True)
            pytest.skip(f"in-toto-attestation could not be installed into {ITA_VENV}: {e}")
    return python


def test_the_in_toto_attestation_bindings_parse_our_provenance(tmp_path):
    python = ita_python()
    stmt = provenance(make_inputs(tmp_path, remote="git@git.example:org/p.git", dirty=True))
    out = subprocess.run(
        [str(python), "-c", PARSE],
        input=json.dumps(stmt),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    count, builder = out.stdout.split()
    assert int(count) == len(stmt["predicate"]["buildDefinition"]["resolvedDependencies"])
    assert builder == stmt["predicate"]["runDetails"]["builder"]["id"]
