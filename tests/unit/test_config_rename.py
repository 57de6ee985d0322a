"""``data.batch_size`` was renamed ``data.global_batch_size`` (the global batch of one
micro-step). The old key still reads wherever a config is read — a YAML file, the overrides, the
config.yaml of an earlier run (what a resume is given) and the config inside an earlier
checkpoint (what eval and export rebuild from) — with one FutureWarning naming both keys; the
two set to different values is a one-line ConfigError naming both."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from mmpretrain.config import RENAMED, ConfigError, all_keys, config_from_dict, load_config, to_dict

OLD, NEW = "data.batch_size", "data.global_batch_size"
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _old_style(tree: dict) -> dict:
    """``tree`` as an earlier version wrote it: ``batch_size`` in the data section."""
    data = {("batch_size" if k == "global_batch_size" else k): v for k, v in tree["data"].items()}
    return {**tree, "data": data}


def _renamed_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning) and OLD in str(w.message)]


def _one_warning_naming_both(record) -> None:
    msgs = _renamed_warnings(record)
    assert len(msgs) == 1, msgs
    assert OLD in msgs[0] and NEW in msgs[0] and "\n" not in msgs[0], msgs[0]


def test_the_table_and_the_tree():
    assert RENAMED == {OLD: NEW}
    assert NEW in all_keys() and OLD not in all_keys()


def test_an_old_yaml_reads_as_the_new_key_with_one_warning(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("data:\n  image_size: 32\n  batch_size: 16\n  num_workers: 0\n")
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(p)
    assert cfg.data.global_batch_size == 16
    _one_warning_naming_both(record)
    assert "old.yaml" in _renamed_warnings(record)[0]
    # the new key alone: no warning
    p.write_text("data:\n  global_batch_size: 16\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert load_config(p).data.global_batch_size == 16
    # an override of the new name replaces the old key of the file
    with pytest.warns(FutureWarning):
        p.write_text("data:\n  batch_size: 16\n")
        assert load_config(p, ["data.global_batch_size=8"]).data.global_batch_size == 8


def test_the_old_override_works_the_same():
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(TINY, ["data.batch_size=8"])
    assert cfg.data.global_batch_size == 8
    assert cfg == load_config(TINY, ["data.global_batch_size=8"])
    _one_warning_naming_both(record)
    with pytest.warns(FutureWarning):  # the same value under both names is no conflict
        assert load_config(None, ["data.batch_size=8", "data.global_batch_size=8"]).data.global_batch_size == 8
    # bare ``batch_size`` stays ambiguous (data's, formerly this name, and eval's)
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(None, ["batch_size=8"])


@pytest.mark.parametrize("yaml_text, overrides", [
    ("data:\n  batch_size: 16\n  global_batch_size: 8\n", []),
    (None, ["data.batch_size=16", "data.global_batch_size=8"]),
    (None, ["data.global_batch_size=8", "data.batch_size=16"]),
])
def test_both_set_and_disagreeing_is_one_line_naming_both(tmp_path, yaml_text, overrides):
    path = None
    if yaml_text is not None:
        path = tmp_path / "both.yaml"
        path.write_text(yaml_text)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg and f"{OLD}=16" in msg and f"{NEW}=8" in msg, msg
    assert not _renamed_warnings(record)  # the error is the only line


def test_the_cli_prints_one_error_line(tmp_path, capsys):
    from mmpretrain import train

    assert train.main(["--config", str(TINY), "--print-config", "data.batch_size=16", "data.global_batch_size=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and OLD in err[0] and NEW in err[0], err


def test_a_saved_old_run_config_is_read_by_resume_eval_and_export(tmp_path):
    """An earlier run directory: its config.yaml (what the printed resume command passes as
    ``--config``) and a checkpoint's mmpretrain.json config (what ``load_checkpoint`` rebuilds
    eval and export from) both say ``data.batch_size``."""
    from mmpretrain.export.format import CKPT_FORMAT, META_FILE, MODEL_KEYS, _config_tree, read_meta

    want = load_config(TINY, ["data.global_batch_size=24"])
    old = _old_style(to_dict(want))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert "batch_size: 24" in (run / "config.yaml").read_text()
    assert "global_batch_size" not in (run / "config.yaml").read_text()

    with pytest.warns(FutureWarning) as record:  # resume: --config RUN/config.yaml train.resume=latest
        resumed = load_config(run / "config.yaml", ["train.resume=latest"])
    _one_warning_naming_both(record)
    assert resumed.data.global_batch_size == 24 and resumed.data == want.data

    (ckpt / META_FILE).write_text(json.dumps({"format": CKPT_FORMAT, "step": 3, "config": old, "vocab_size": 1000}))
    with pytest.warns(FutureWarning) as record:  # eval / export: load_checkpoint -> _config_tree(meta)
        cfg = _config_tree(read_meta(ckpt, MODEL_KEYS))
    _one_warning_naming_both(record)
    assert cfg == want
    with pytest.warns(FutureWarning):
        assert config_from_dict(old) == want
    # mmpretrain eval's overrides on that config: the old name too
    from mmpretrain.evaluation.cli import _apply_overrides

    with pytest.warns(FutureWarning):
        assert _apply_overrides(cfg, ["data.batch_size=48"]).data.global_batch_size == 48


def test_a_saved_config_with_both_names_disagreeing_is_refused():
    tree = to_dict(load_config(None))
    tree["data"]["batch_size"] = 7
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree)
    assert OLD in str(e.value) and NEW in str(e.value) and "\n" not in str(e.value)


def test_print_config_shows_the_new_key_with_its_doc(capsys):
    from mmpretrain import train

    assert train.main(["--print-config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.strip().startswith("global_batch_size:"))
    assert lines[i - 1].strip().startswith("#"), lines[i - 3:i + 1]
    assert "global batch of one micro-step" in " ".join(lines[i - 4:i])
    data = lines[lines.index("data:"):lines.index("model:")]
    assert not any(line.strip().startswith("batch_size:") for line in data)  # no old key in the data section
