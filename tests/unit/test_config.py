"""Config validation: every bad config names file, line and key, and nothing runs."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import FAST_PIPELINE, chainproof, write_config


def problems(tmp_path, body: str) -> list:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    return info.value.problems


def test_default_config_loads_in_dependency_order():
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "digits-cnn.yaml")
    assert [s.name for s in cfg.stages] == ["source", "train", "package", "deploy"]
    assert cfg.lock.name == "main.txt" and cfg.lock.is_file()
    assert cfg.stage("train").params["epochs"] >= 1
    with pytest.raises(TypeError):
        cfg.stage("train").params["epochs"] = 3  # frozen


def test_stages_are_sorted_by_needs_not_by_position(tmp_path):
    cfg = load_config(
        write_config(
            tmp_path,
            """
        schema: 1
        name: p
        lock: @MAIN_LOCK@
        stages:
          - {name: b, kind: package, needs: [a]}
          - {name: a, kind: train, needs: [s]}
          - {name: s, kind: source, params: {dataset: sklearn-digits}}
    """,
        )
    )
    assert [s.name for s in cfg.stages] == ["s", "a", "b"]


def test_unknown_key_names_line_and_key(tmp_path):
    (p,) = problems(
        tmp_path,
        FAST_PIPELINE.replace(
            "    params: {epochs: 2, seed: 7}", "    params: {epochs: 2, seed: 7}\n    retries: 3"
        ),
    )
    assert p.key == "stages[1].retries" and p.line == 14 and "unknown key" in p.message


def test_wrong_type(tmp_path):
    (p,) = problems(tmp_path, FAST_PIPELINE.replace("epochs: 2", "epochs: two"))
    assert p.key == "stages[1].params.epochs" and p.line == 13
    assert "integer" in p.message and "'two'" in p.message


def test_timeout_must_be_an_integer_not_a_string(tmp_path):
    (p,) = problems(
        tmp_path,
        FAST_PIPELINE.replace("    kind: package\n", "    kind: package\n    timeout: '60'\n"),
    )
    assert p.key == "stages[2].timeout"


def test_unknown_stage_kind(tmp_path):
    (p,) = problems(tmp_path, FAST_PIPELINE.replace("kind: package", "kind: pakage"))
    assert p.key == "stages[2].kind" and "unknown stage kind 'pakage'" in p.message
    assert "package" in p.message  # the expected kinds are listed


def test_missing_required_field(tmp_path):
    ps = problems(tmp_path, FAST_PIPELINE.replace("lock: @MAIN_LOCK@\n", ""))
    assert [p.key for p in ps] == ["lock"] and "missing" in ps[0].message


def test_duplicate_stage_name(tmp_path):
    ps = problems(tmp_path, FAST_PIPELINE.replace("name: package", "name: train"))
    assert ps[0].key == "stages[2].name" and ps[0].line == 14
    assert "duplicate stage name 'train' (first at stages[1])" in ps[0].message


def test_a_stage_cannot_take_the_name_of_a_run_directory(tmp_path):
    body = FAST_PIPELINE.replace("- name: source\n", "- name: logs\n").replace(
        "needs: [source]", "needs: [logs]"
    )
    ps = problems(tmp_path, body)
    assert ps[0].key == "stages[0].name" and ps[0].line == 7
    assert "stage name 'logs' is a directory the runner keeps in each run" in ps[0].message


def test_cycle(tmp_path):
    ps = problems(
        tmp_path, FAST_PIPELINE.replace("kind: source\n", "kind: source\n    needs: [deploy]\n")
    )
    assert ps[0].key == "stages" and "cycle" in ps[0].message


def test_need_of_an_unknown_stage(tmp_path):
    (p,) = problems(tmp_path, FAST_PIPELINE.replace("needs: [train]", "needs: [trian]"))
    assert p.key == "stages[2].needs[0]" and "trian" in p.message


def test_output_path_escaping_the_run_directory(tmp_path):
    body = FAST_PIPELINE.replace(
        "    kind: package\n",
        "    kind: package\n"
        "    outputs: [model.keras, saved_model/, metrics.json, model_card.json, model_card.md,"
        " bom.cdx.json, ../../evil]\n",
    )
    (p,) = problems(tmp_path, body)
    assert p.key == "stages[2].outputs[6]" and "escapes" in p.message


def test_stage_params_are_checked_by_their_kind(tmp_path):
    (p,) = problems(
        tmp_path, FAST_PIPELINE.replace("seed: 7}\n  - name: train", "sed: 7}\n  - name: train")
    )
    assert p.key == "stages[0].params.sed"


def test_duplicate_yaml_key_is_an_error_not_last_wins(tmp_path):
    ps = problems(
        tmp_path, FAST_PIPELINE.replace("name: digits-fast\n", "name: digits-fast\nname: other\n")
    )
    assert ps[0].key == "name" and "duplicate key" in ps[0].message and ps[0].line == 3


def test_unsupported_schema_version(tmp_path):
    (p,) = problems(tmp_path, FAST_PIPELINE.replace("schema: 1", "schema: 2"))
    assert p.key == "schema" and p.line == 1 and "expected 1" in p.message


def test_invalid_yaml(tmp_path):
    (p,) = problems(tmp_path, "schema: 1\nstages: [\n")
    assert "not valid YAML" in p.message


def test_all_problems_are_reported_at_once(tmp_path):
    body = FAST_PIPELINE.replace("kind: package", "kind: pakage").replace("epochs: 2", "epochs: -1")
    keys = {p.key for p in problems(tmp_path, body)}
    assert keys == {"stages[2].kind", "stages[1].params.epochs"}


def test_cli_exits_2_before_anything_runs(tmp_path):
    cfg = write_config(tmp_path, FAST_PIPELINE.replace("kind: package", "kind: pakage"))
    proc = chainproof("run", cfg, "--workspace", tmp_path / "ws")
    assert proc.returncode == 2
    assert f"{cfg}:15: stages[2].kind" in proc.stderr
    assert not (tmp_path / "ws").exists(), "nothing may run (or be created) on a bad config"


def test_augmentation_knob_without_a_layer_equivalent_is_refused(tmp_path):
    body = FAST_PIPELINE.replace(
        "params: {epochs: 2, seed: 7}",
        "params: {epochs: 2, augmentation: {rotation_range: 10, channel_shift_range: 0.2}}",
    )
    (p,) = problems(tmp_path, body)
    assert p.key == "stages[1].params.augmentation"
    assert "'channel_shift_range' has no Keras preprocessing-layer equivalent" in p.message


def test_layer_specs_are_validated(tmp_path):
    body = FAST_PIPELINE.replace(
        "params: {epochs: 2, seed: 7}",
        "params: {layers: [{type: conv2d, filters: 8}, {type: flatten}]}",
    )
    (p,) = problems(tmp_path, body)
    assert p.key == "stages[1].params.layers[0]" and "needs kernel_size" in p.message
