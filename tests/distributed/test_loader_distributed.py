"""Two real gloo processes iterate one epoch of ShardLoader with an all_reduce per batch.

The shards hold bad samples (skipped on one rank only) and a truncated tar; the balanced plan
must still give both ranks the same number of batches, or the collective would hang (the
test then fails on its timeout).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _proc
from _shardutil import caption_for, jpeg_bytes, write_raw_shard, write_test_shards

pytestmark = pytest.mark.distributed
TIMEOUT_S = 120  # a rank stuck in a collective fails after this; generous for start-up under load



def _rank_main(rank: int, world: int, port: int, data_dir: str, tok_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    from transformers import AutoTokenizer

    from mmpretrain.data.config import DataConfig
    from mmpretrain.data.loader import ShardLoader

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = DataConfig(train_shards=[os.path.join(data_dir, "train-*.tar")], global_batch_size=6, num_workers=2,
                     image_size=8, max_length=8, shuffle_buffer=4)
    loader = ShardLoader(cfg, tok, rank=rank, world_size=world, seed=11)
    n, total, keys = 0, 0, []
    for batch in loader:
        t = torch.tensor([batch["pixels"].shape[0]], dtype=torch.int64)
        dist.all_reduce(t)
        total += int(t.item())
        n += 1
        keys += batch["keys"]
    done = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(done)  # a rank with more batches would still be waiting in the loop above
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"batches": n, "planned": loader.batches_per_epoch, "total": total, "sum_batches": int(done),
                   "skipped": loader.skipped, "keys": keys}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_one_epoch_equal_batches(tmp_path):
    data = str(tmp_path / "shards")
    write_test_shards(data, 3, [9, 5, 7])
    good = jpeg_bytes(8, 8)
    write_raw_shard(os.path.join(data, "train-000003.tar"), [
        {"__key__": "bad_a", "jpg": b"junk", "txt": "x"},
        {"__key__": "bad_b", "jpg": good, "txt": ""},
        {"__key__": "bad_c", "jpg": good},
        {"__key__": "ok_1", "jpg": good, "txt": "fine"},
    ])
    from mmpretrain.data.tokenizer import train_tokenizer

    tok_dir = str(tmp_path / "tok")
    train_tokenizer([caption_for(i) for i in range(50)], tok_dir, 80)
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(_rank_main, args=(2, _proc.free_port(), data, tok_dir, str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("distributed loader epoch did not finish: a rank is stuck in a collective")
    res = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert res[0]["batches"] == res[1]["batches"] == res[0]["planned"] == res[1]["planned"] > 0
    assert res[0]["sum_batches"] == 2 * res[0]["batches"]
    assert res[0]["total"] == res[1]["total"] == 6 * res[0]["batches"]
    skipped = {}
    for r in res:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    keys = res[0]["keys"] + res[1]["keys"]
    assert not any(k.startswith("bad_") for k in keys)
