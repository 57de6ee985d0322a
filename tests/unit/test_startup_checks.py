"""Start-up checks (issue 11): each bad input is one line on stderr naming the config key (and the
file), exit 2, before anything is written: no run directory created, an existing one untouched.

Every case goes through the real CLI entry, ``mmpretrain.train.main``, in this process, on
``configs/tiny.yaml``. The cases that get past the config need shards that exist: an empty file
named ``.tar`` is enough, the checks only look for the files.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mmpretrain import train
from mmpretrain.config import ConfigError, config_from_dict, load_config, to_dict

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "shards" / "train-000000.tar"
    path.parent.mkdir()
    path.write_bytes(b"")
    return path


def run(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str, Path]:
    """``mmpretrain train --config configs/tiny.yaml train.output_dir=RUN overrides``: exit code,
    stderr, the run directory."""
    out = tmp_path / "run"
    code = train.main(["--config", str(TINY), f"train.output_dir={out}", *overrides])
    return code, capsys.readouterr().err, out


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mmpretrain train: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("override, key, expected", [
    ("data.max_length=0", "data.max_length", "must be >= 1, got 0"),
    ("data.max_image_pixels=0", "data.max_image_pixels", "must be >= 1, got 0"),
    ("data.max_image_pixels=-5", "data.max_image_pixels", "must be >= 1, got -5"),
    ("data.num_workers=-1", "data.num_workers", "must be >= 0, got -1"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer", "must be >= 0, got -1"),
    ("data.global_batch_size=0", "data.global_batch_size", "must be >= 1, got 0"),
])
def test_a_bad_data_value_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, override, key, expected):
    code, err, out = run(tmp_path, capsys, override)
    line = one_line(err)
    assert code == 2 and key in line and expected in line and "tiny.yaml" in line, line
    assert not out.exists()
    # the same section check holds for a checkpoint's tree (what `mmpretrain eval` overrides)
    tree = to_dict(load_config(TINY))
    section, leaf = key.split(".")
    tree[section][leaf] = int(override.split("=")[1])
    with pytest.raises(ConfigError, match=key):
        config_from_dict(tree)


@pytest.mark.parametrize("overrides, expected", [
    (["model.patch_size=7", "model.image_size=32"], "model.patch_size=7 must divide model.image_size=32"),
    (["model.patch_size=6", "model.image_size=32", "model.image_stem=patch"], "model.patch_size=6 must divide "
                                                                                 "model.image_size=32"),
    (["model.patch_size=6", "model.image_size=48"], "model.image_stem='resnet' needs model.patch_size a multiple "
                                                    "of 4, got 6"),
])
def test_patches_that_do_not_tile_the_image_are_refused_naming_both_keys(tmp_path, capsys, shard, overrides,
                                                                         expected):
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}", *overrides)
    line = one_line(err)
    assert code == 2 and expected in line, line
    assert f"{TINY}: {expected}" in line, line  # the config file named as load_config names it
    assert not out.exists()


def test_patches_that_tile_the_image_pass_the_check():
    load_config(TINY, ["model.patch_size=4", "model.image_size=32"]).model.check_image_grid()
    load_config(TINY, ["model.arch=dual_encoder", "model.patch_size=7", "model.image_size=32"]).model.check_image_grid()


def test_a_brace_pattern_matching_no_files_names_the_pattern_and_writes_nothing(tmp_path, capsys, shard):
    pattern = str(shard.parent / "train-{000010..000013}.tar")
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{pattern}]", f"data.val_shards={shard}")
    line = one_line(err)
    assert code == 2 and "data.train_shards" in line and f"no shards match {pattern!r}" in line, line
    assert "none of its 4 files exist" in line and str(shard.parent / "train-000010.tar") in line, line
    assert "batch_size" not in line
    assert not out.exists()
    # the held-out shards the same way (evaluation at the end reads them)
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={pattern}")
    line = one_line(err)
    assert code == 2 and "data.val_shards" in line and "none of its 4 files exist" in line, line
    assert not out.exists()
    # an earlier run's directory is left exactly as it was
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err, _ = run(tmp_path, capsys, f"data.train_shards=[{pattern}]", f"data.val_shards={shard}")
    assert code == 2 and "no shards match" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_brace_pattern_with_some_files_present_is_accepted(shard):
    from mmpretrain.trainer.loop import _matches_nothing

    assert _matches_nothing(str(shard.parent / "train-{000000..000003}.tar")) is None


def test_a_hub_tokenizer_name_fails_at_once_without_trying_the_hub(tmp_path, capsys, shard, monkeypatch):
    # offline (the machines that run this suite have no hub): a name not in the cache fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if (Path.home() / ".cache" / "huggingface" / "hub" / "models--bert-base-uncased").exists():
        pytest.skip("bert-base-uncased is in the local Hugging Face cache here")
    start = time.monotonic()
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}",
                         "data.tokenizer=bert-base-uncased")
    took = time.monotonic() - start
    line = one_line(err)
    assert code == 2 and "data.tokenizer='bert-base-uncased' is not a local tokenizer directory or file" in line, line
    assert f"{TINY}: data.tokenizer=" in line, line  # the config file named as load_config names it
    assert "no download is tried" in line
    assert took < 20, f"{took:.1f} s: the hub client retries for about a minute without a network"
    assert not out.exists()
    # a directory that holds no tokenizer, and a file, are named as such
    empty = tmp_path / "empty"
    empty.mkdir()
    for spec, expected in ((empty, "is a directory that holds no loadable tokenizer"),
                           (shard, "is a file, not a tokenizer directory")):
        code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}",
                             f"data.tokenizer={spec}")
        line = one_line(err)
        assert code == 2 and f"{TINY}: data.tokenizer={str(spec)!r} {expected}" in line, line
        assert not out.exists()


def _shard_listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("samples", [
    None,  # an empty file named .tar (no sample at all)
    [{"__key__": "a", "jpg": b"x"}, {"__key__": "b", "jpg": b"y"}],  # images, no caption member
    [{"__key__": "a", "jpg": b"x", "txt": b"\xff\xfe not utf-8"}, {"__key__": "b", "jpg": b"y", "txt": " \n "}],
], ids=["empty-tar", "no-txt", "unreadable-or-blank-txt"])
def test_auto_tokenizer_on_shards_without_captions_fails_before_anything_is_written(tmp_path, capsys, shard,
                                                                                      samples):
    from _shardutil import write_raw_shard

    if samples is not None:
        write_raw_shard(str(shard), samples)
    before = _shard_listing(shard.parent)
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}",
                         "data.tokenizer=auto")
    line = one_line(err)
    assert code == 2 and f"{TINY}: data.tokenizer='auto'" in line, line
    assert "data.train_shards" in line and str(shard) in line and "no sample with a readable caption" in line, line
    assert not out.exists()
    assert _shard_listing(shard.parent) == before  # no tokenizer/ (nor its temporary folder) in the shard folder
    # an earlier run's directory is left exactly as it was
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err, _ = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}")
    assert code == 2 and "no sample with a readable caption" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert _shard_listing(shard.parent) == before


def test_auto_tokenizer_check_passes_on_one_caption_or_a_saved_tokenizer_and_writes_nothing(shard):
    from _shardutil import write_raw_shard
    from mmpretrain.data.tokenizer import TOKENIZER_DIRNAME, check_tokenizer

    write_raw_shard(str(shard), [{"__key__": "a", "jpg": b"x"}, {"__key__": "b", "jpg": b"y", "txt": "a red cube"}])
    before = _shard_listing(shard.parent)
    check_tokenizer("auto", [str(shard)])
    assert _shard_listing(shard.parent) == before
    # a tokenizer saved beside the shards: the shards are not read (no caption needed)
    write_raw_shard(str(shard), [{"__key__": "a", "jpg": b"x"}])
    (shard.parent / TOKENIZER_DIRNAME).mkdir()
    (shard.parent / TOKENIZER_DIRNAME / "tokenizer_config.json").write_text("{}")
    check_tokenizer("auto", [str(shard)])


def test_eval_shards_brace_pattern_with_no_files_fails_before_the_checkpoint_is_read(tmp_path, capsys, shard,
                                                                                     monkeypatch):
    import mmpretrain.export
    from mmpretrain.evaluation import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --shards was checked")

    monkeypatch.setattr(mmpretrain.export, "load_checkpoint", no_loading)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "mmpretrain.json").write_text("{}")
    pattern = str(shard.parent / "val-{000000..000003}.tar")
    code = cli.main(["--checkpoint", str(ckpt), "--shards", pattern])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("mmpretrain eval: error: --shards (data.val_shards): "), line
    assert f"no shards match {pattern!r}: none of its 4 files exist" in line, line
    assert str(shard.parent / "val-000000.tar") in line and str(shard.parent / "val-000003.tar") in line, line
    assert sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")) == \
        ["checkpoints", "checkpoints/step_00000010", "checkpoints/step_00000010/mmpretrain.json"]
    # a run directory: the same one line (no "evaluating its newest checkpoint" note before it)
    code = cli.main(["--checkpoint", str(tmp_path / "run"), "--shards", pattern])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "none of its 4 files exist" in lines[0], lines
    # a pattern with a file present is not refused: the checkpoint is read next
    loaded = []

    def record(path):
        loaded.append(path)
        raise mmpretrain.export.ExportError("stand-in checkpoint")

    monkeypatch.setattr(mmpretrain.export, "load_checkpoint", record)
    code = cli.main(["--checkpoint", str(ckpt), "--shards", str(shard.parent / "train-{000000..000003}.tar")])
    assert code == 2 and loaded == [str(ckpt)]


@pytest.mark.parametrize("override, expected", [
    ("loss.itc_word_negatives=2", "loss.itc_word_negatives does not combine with the feature cache"),
    ("loss.itc_token_weight=0.5", "loss.itc_token_weight does not combine with the feature cache"),
    ("model.dropout=0.1", "train.feature_cache needs model.dropout=0"),
], ids=["itc_word_negatives", "itc_token_weight", "dropout"])
def test_feature_cache_conflicts_are_one_line_naming_the_file_and_the_keys(tmp_path, capsys, shard, override,
                                                                          expected):
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={shard}",
                         "train.grad_accum_steps=2", "train.feature_cache=true", "loss.contrastive=infonce", override)
    line = one_line(err)
    assert code == 2 and f"{TINY}: {expected}" in line, line  # the config file named as load_config names it
    assert not out.exists()


def test_missing_train_or_val_shards_name_the_config_file(tmp_path, capsys, shard):
    from mmpretrain.trainer.loop import check_data

    pattern = str(shard.parent / "train-{000010..000013}.tar")
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{pattern}]", f"data.val_shards={shard}")
    line = one_line(err)
    assert code == 2 and f"{TINY}: data.train_shards: no shards match {pattern!r}" in line, line
    assert not out.exists()
    code, err, out = run(tmp_path, capsys, f"data.train_shards=[{shard}]", f"data.val_shards={pattern}")
    line = one_line(err)
    assert code == 2 and f"{TINY}: data.val_shards: no shards match {pattern!r}" in line, line
    assert not out.exists()
    # still a FileNotFoundError for callers of check_data; a tree of a dict names no file
    with pytest.raises(FileNotFoundError, match=r"^data\.train_shards: no shards match"):
        check_data(config_from_dict({"data": {"train_shards": [pattern]}}), need_val=False)


def _checkpoint_with_val_shards(folder: Path, val_shards: str) -> Path:
    """A checkpoint directory whose ``mmpretrain.json`` holds the tiny config with ``val_shards``
    (no weights: the tests below prove that nothing is loaded)."""
    import json

    ckpt = folder / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    tree = to_dict(load_config(TINY, [f"data.val_shards={val_shards}"]))
    (ckpt / "mmpretrain.json").write_text(json.dumps({"format": "mmpretrain-ckpt/1", "step": 10, "config": tree,
                                                      "vocab_size": 64}))
    return ckpt


def test_eval_without_shards_checks_the_saved_val_shards_before_the_checkpoint_is_read(tmp_path, capsys, shard,
                                                                                      monkeypatch):
    import mmpretrain.export
    from mmpretrain.evaluation import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before data.val_shards was checked")

    monkeypatch.setattr(mmpretrain.export, "load_checkpoint", no_loading)
    pattern = str(shard.parent / "val-{000000..000003}.tar")
    run_dir = tmp_path / "run"
    ckpt = _checkpoint_with_val_shards(run_dir, pattern)
    listing = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    for target in (ckpt, run_dir):  # a run directory: no "evaluating its newest checkpoint" note before it
        code = cli.main(["--checkpoint", str(target)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, lines
        line = lines[0]
        assert line.startswith(f"mmpretrain eval: error: {ckpt / 'mmpretrain.json'}: data.val_shards"), line
        assert f"no shards match {pattern!r}: none of its 4 files exist" in line, line
        assert str(shard.parent / "val-000000.tar") in line and str(shard.parent / "val-000003.tar") in line, line
        assert "--shards PATTERN" in line, line
        assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == listing  # nothing written
    _assert_the_override_is_checked(cli, capsys, ckpt, shard.parent / "other-*.tar")
    loaded = _record_loads(monkeypatch, "stand-in checkpoint")
    # saved shards with a file present, an override that exists, --shards, --classify-only: the checkpoint is read
    for argv in (["--checkpoint", str(_checkpoint_with_val_shards(tmp_path / "present", str(shard)))],
                 ["--checkpoint", str(ckpt), f"data.val_shards={shard}"],
                 ["--checkpoint", str(ckpt), "--shards", str(shard)],
                 ["--checkpoint", str(ckpt), "--classify-only", "--classify", str(tmp_path)]):
        code = cli.main(argv)
        assert code == 2 and loaded == [argv[1]], (argv, capsys.readouterr().err)
        assert "stand-in checkpoint" in capsys.readouterr().err
        loaded.clear()
    # a path that is plainly no checkpoint is still named first, by load_checkpoint
    monkeypatch.undo()
    code = cli.main(["--checkpoint", str(shard.parent)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not an mmpretrain checkpoint" in err, err


def test_eval_of_an_export_without_shards_checks_the_default_val_shards_before_the_model_is_read(
        tmp_path, capsys, monkeypatch):
    import json

    import mmpretrain.export
    from mmpretrain.config import Config
    from mmpretrain.evaluation import cli
    from mmpretrain.export.format import EXPORT_FORMAT

    def no_loading(*args, **kwargs):
        raise AssertionError("the export was loaded before data.val_shards was checked")

    monkeypatch.setattr(mmpretrain.export, "load_checkpoint", no_loading)
    monkeypatch.chdir(tmp_path)  # the default pattern is relative: here it matches no file
    pattern = Config().data.val_shards  # an export saves no data config: load_checkpoint gives it the default
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, "step": 10}))
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code = cli.main(["--checkpoint", str(export)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"mmpretrain eval: error: {export / 'config.json'}: data.val_shards (the default"), line
    assert f"no shards match {pattern!r}" in line and "--shards PATTERN" in line, line
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing  # nothing written
    _assert_the_override_is_checked(cli, capsys, export, tmp_path / "other-*.tar")
    loaded = _record_loads(monkeypatch, "stand-in export")
    shard = tmp_path / "present" / "val-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    other = tmp_path / "other"  # a config.json of another format: load_checkpoint names it
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    # an override that exists, --shards, --classify-only, another format: the export is read
    for argv in (["--checkpoint", str(export), f"data.val_shards={shard}"],
                 ["--checkpoint", str(export), "--shards", str(shard)],
                 ["--checkpoint", str(export), "--classify-only", "--classify", str(tmp_path)],
                 ["--checkpoint", str(other)]):
        code = cli.main(argv)
        assert code == 2 and loaded == [argv[1]], (argv, capsys.readouterr().err)
        assert "stand-in export" in capsys.readouterr().err
        loaded.clear()
    # the default pattern with a file present is not refused either
    (tmp_path / pattern).parent.mkdir(parents=True)
    (tmp_path / pattern.replace("*", "000000")).write_bytes(b"")
    code = cli.main(["--checkpoint", str(export)])
    assert code == 2 and loaded == [str(export)], capsys.readouterr().err


def _assert_the_override_is_checked(cli, capsys, path, missing) -> None:
    """A ``data.val_shards=`` override is what eval checks, and it is named as the key alone."""
    code = cli.main(["--checkpoint", str(path), f"data.val_shards={missing}"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mmpretrain eval: error: data.val_shards: no shards match"), lines[0]
    assert Path(missing).name in lines[0], lines[0]


def _record_loads(monkeypatch, message: str) -> list:
    """``mmpretrain.export.load_checkpoint`` replaced by a stand-in that records its path and fails
    with ``message``; returns the list of recorded paths."""
    import mmpretrain.export

    loaded = []

    def record(path):
        loaded.append(path)
        raise mmpretrain.export.ExportError(message)

    monkeypatch.setattr(mmpretrain.export, "load_checkpoint", record)
    return loaded
