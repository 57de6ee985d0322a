"""Every hint an error prints works when followed (the config keys and values it names)."""

from __future__ import annotations

import pytest

from mmpretrain.config import load_config


def test_mixed_precision_no_as_the_hints_write_it():
    """`train.mixed_precision=no` (the non-finite-steps hint): YAML reads a bare `no` as false."""
    assert load_config("configs/tiny.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config("configs/tiny.yaml", ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


@pytest.mark.parametrize("config", ["configs/vilt_b32.yaml", "configs/tiny.yaml"])
def test_missing_val_shards_hint_names_every_setting_that_reads_them(tmp_path, config):
    from _shardutil import write_raw_shard
    from mmpretrain.trainer.loop import check_data

    write_raw_shard(str(tmp_path / "train-000000.tar"), [{"__key__": "a", "txt": "x", "jpg": b"x"}])
    base = [f"data.train_shards=[{tmp_path}/train-*.tar]", f"data.val_shards={tmp_path}/val-*.tar",
            "train.eval_every=50", "train.eval_at_end=true",
            "data.tokenizer=auto"]  # vilt_b32 names bert-base-uncased: no hub in tests
    cfg = load_config(config, base)
    with pytest.raises(FileNotFoundError) as err:
        check_data(cfg, need_val=True, need_val_loss=True)
    message = str(err.value)
    fix = message.split("; set ", 1)[1].split(" to train without them", 1)[0].split()
    assert fix == ["train.eval_at_end=false", "train.eval_every=0"], message
    cfg = load_config(config, base + fix)  # followed: the same check passes
    t = cfg.train
    check_data(cfg, need_val=t.eval_at_end or t.eval_every > 0, need_val_loss=t.eval_every > 0 and t.val_batches > 0)
