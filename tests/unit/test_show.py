"""`chainproof show`: the chain of a run or a release bundle, as a tree and as JSON.

Sides come from `tests/unit/compare/lineages.py`: real DSSE-signed links, tiny files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from securesystemslib.signer import CryptoSigner

from pipeline.cli import cli
from pipeline.errors import InputError
from pipeline.provenance.links import write_link
from pipeline.show import read_chain, render_chain
from tests.unit.compare.lineages import DATASET, finding, make_bundle, make_run, sha, side

TREE_LINE = re.compile(r"^(├──|└──|│   ├──|│   └──|    ├──|    └──) ")


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def show(*args: str | Path) -> tuple[int, str, BaseException | None]:
    """`chainproof show ARGS` as the CLI runs it: (exit code, stdout, the error it raised)."""
    result = CliRunner().invoke(cli, ["show", *map(str, args)])
    return result.exit_code, result.output, result.exception


def tree(text: str) -> list[str]:
    """The lines below the three header lines."""
    return text.splitlines()[3:]


def test_a_bundle_shows_the_same_tree_as_the_run_it_came_from(tmp_path: Path, signer) -> None:
    s = side(findings=[finding("PYSEC-2023-1", "urllib3", "1.26.0")])
    run = make_run(tmp_path, "r1", s, signer)
    bundle = make_bundle(tmp_path, "1.0", s, signer)

    code, out, error = show(bundle)

    assert code == 0 and error is None, out
    head = out.splitlines()
    assert head[0].startswith("release digits 1.0  pipeline digits")
    assert head[1] == (
        f"links {bundle / 'attestations'}  (unverified view: use `chainproof verify` to check)"
    )
    assert head[2].startswith("dependencies: scanned against db dddddddddddd…: pass, 1 finding")
    assert tree(out) == tree(render_chain(run))
    assert f"out  {sha(DATASET)[:16]}  source/dataset.npz" in out


def test_tree_glyphs_last_child_corner_others_tee_and_continuation_bar(
    tmp_path: Path, signer
) -> None:
    lines = tree(render_chain(make_run(tmp_path, "r1", side(), signer)))

    assert all(TREE_LINE.match(line) for line in lines), lines
    stages = [i for i, line in enumerate(lines) if not line.startswith(("│", " "))]
    assert [lines[i].split()[1] for i in stages] == ["source", "train", "package"]
    assert [lines[i][:3] for i in stages] == ["├──", "├──", "└──"]  # only the last is a corner
    for start, end in zip(stages, [*stages[1:], len(lines)], strict=True):
        children = lines[start + 1 : end]
        last_stage = start == stages[-1]
        assert children and all(c.startswith("    " if last_stage else "│   ") for c in children)
        assert [c[4:7] for c in children] == ["├──"] * (len(children) - 1) + ["└──"]
    assert lines[stages[1] + 1] == f"│   ├── in   {sha(DATASET)[:16]}  source/dataset.npz"


def test_json_is_the_whole_chain_with_full_digests_and_unverified(tmp_path: Path, signer) -> None:
    bundle = make_bundle(tmp_path, "1.0", side(findings=None), signer)

    code, out, _ = show(bundle, "--json")

    assert code == 0
    doc = json.loads(out)
    assert out.rstrip("\n") == json.dumps(doc, indent=2, sort_keys=True)
    assert doc["kind"] == "bundle" and doc["label"] == "release digits 1.0"
    assert doc["verified"] is False and "chainproof verify" in doc["note"]
    assert doc["dependencies_scanned"] is False
    assert doc["dependency_scan"] == "NOT SCANNED (no database at x.sqlite)"
    assert [s["name"] for s in doc["stages"]] == ["source", "train", "package"]
    source = doc["stages"][0]
    assert source["products"]["source/dataset.npz"] == sha(DATASET)  # whole, not cut to 16
    assert source["command"][:4] == ["python", "-I", "-m", "stages.source"]
    assert source["return_value"] == 0 and len(source["keyid_prefix"]) == 8
    assert source["link"] == f"source.{source['keyid_prefix']}.link"


def test_a_run_shows_a_stage_that_left_no_link_and_an_unscanned_run_says_so(
    tmp_path: Path, signer
) -> None:
    run = make_run(tmp_path, "r1", side(findings=None), signer)
    for link in (tmp_path / "attestations" / "runs" / "r1").glob("train.*.link"):
        link.unlink()

    view = read_chain(run)
    text = render_chain(run)

    assert [(s.name, s.link is None) for s in view.stages] == [
        ("source", False),
        ("train", True),
        ("package", False),
    ]
    assert "├── train: no link (did not complete)" in text.splitlines()
    assert text.splitlines()[0] == "run r1  pipeline digits  status succeeded"
    assert "dependencies: NOT SCANNED (no database at x.sqlite)" in text


def test_a_hostile_artifact_name_cannot_forge_report_lines(tmp_path: Path, signer) -> None:
    bundle = make_bundle(tmp_path, "1.0", side(), signer)
    (link,) = (bundle / "attestations").glob("package.*.link")
    link.unlink()
    forged = "x\nverified: ok\x1b[2J"
    write_link(
        bundle / "attestations",
        name="package",
        materials={},
        products={forged: {"sha256": "a" * 64}},
        command=["python"],
        byproducts={"return-value": 0},
        environment={},
        signer=signer,
    )

    code, out, _ = show(bundle)

    assert code == 0
    assert "verified: ok" not in out.splitlines() and "\x1b" not in out
    forged_line = "└── out  aaaaaaaaaaaaaaaa  x\\nverified: ok\\x1b[2J"  # one line, escaped
    assert any(line.endswith(forged_line) for line in out.splitlines())


@pytest.mark.parametrize(
    "content",
    [
        "[]",  # not an envelope
        '{"payload": "W10=", "payloadType": "application/vnd.in-toto+json", "signatures": []}',
        "[" * 100_000 + "]" * 100_000,  # past the JSON parser's depth
        '{"signed": {"_type": "layout"}, "signatures": []}',  # a layout under a .link name
        '{"signed": {"_type": "link", "name": 5}, "signatures": []}',
        "\udcff",  # not UTF-8
    ],
)
def test_a_malformed_link_is_bad_input_never_a_crash(tmp_path: Path, signer, content: str) -> None:
    bundle = make_bundle(tmp_path, "1.0", side(), signer)
    (bundle / "attestations" / "evil.12345678.link").write_bytes(
        content.encode("utf-8", "surrogateescape")
    )

    code, out, error = show(bundle)

    assert isinstance(error, InputError), (out, error)
    assert code == 1  # CliRunner's code for a raised error; the real CLI maps InputError to 2
    assert error.exit_code == 2 and "evil.12345678.link" in str(error)


def test_an_oversized_or_deeply_nested_record_is_refused_naming_the_file(
    tmp_path: Path, signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.compare.recorded as recorded

    run = make_run(tmp_path, "r1", side(), signer)
    monkeypatch.setattr(recorded, "MAX_FILE_BYTES", 100)
    with pytest.raises(InputError, match=r"run\.json is \d+ bytes, more than the 100"):
        read_chain(run)
    monkeypatch.undo()
    record = json.loads((run / "run.json").read_text())
    record["status"] = json.loads("[" * 80 + "]" * 80)
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="nests values more than 64 deep"):
        read_chain(run)


def test_neither_a_run_nor_a_bundle_is_bad_input_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(InputError) as e:
            read_chain(target)
        assert e.value.exit_code == 2 and "releases/<name>/<version>" in (e.value.hint or "")


def test_a_copied_bundle_elsewhere_still_shows(tmp_path: Path, signer) -> None:
    """A consumer's copy: nothing outside the bundle directory is needed."""
    bundle = make_bundle(tmp_path / "producer", "1.0", side(), signer)
    copy = shutil.copytree(bundle, tmp_path / "consumer" / "1.0")
    shutil.rmtree(tmp_path / "producer")
    view = read_chain(copy)
    assert view.kind == "bundle" and [s.name for s in view.stages] == ["source", "train", "package"]


def test_a_fine_tuned_release_points_at_its_shipped_upstream(tmp_path: Path, signer) -> None:
    upstream = make_bundle(tmp_path / "up", "0.9", side(), signer)
    origin = {"kind": "bundle", "location": "../releases/digits/0.9", "sha256": "b" * 64}
    bundle = make_bundle(tmp_path, "1.0", side(env={"train": {"base_model": origin}}), signer)
    shipped = shutil.copytree(upstream, bundle / "artifacts" / "upstream" / "train")

    text = render_chain(bundle)
    (train,) = [s for s in read_chain(bundle).stages if s.name == "train"]

    assert train.base_model == {**origin, "upstream": str(shipped)}
    assert (
        f"│   ├── base bbbbbbbbbbbbbbbb  fine-tuned from bundle ../releases/digits/0.9; "
        f"its chain: chainproof show {shipped}"
    ) in text.splitlines()
    assert read_chain(shipped).kind == "bundle"  # and it shows on its own


def test_a_yaml_alias_bomb_in_a_recorded_config_is_refused_quickly(tmp_path: Path) -> None:
    from pipeline.compare.recorded import _read_yaml
    from pipeline.errors import InputError

    lines = ['a0: &n0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 25):
        lines.append(f"a{i}: &n{i} [" + ",".join([f"*n{i - 1}"] * 9) + "]")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="past the .*-node cap"):
        _read_yaml(path)
