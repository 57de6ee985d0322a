"""Export of 2-process DeepSpeed ZeRO-3 and ZeRO-2 checkpoints (gloo): the consolidated weights are
the live ones gathered from the partitions, and (ZeRO-3, one run shared with the first test) every
exported file equals the export of the single-process fp32 checkpoint of the same weights."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import _proc
from _exportutil import REPO, export_files, make_shards, tiny_overrides

from mmpretrain.export import export_checkpoint

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


ZERO3_SCRIPT = r'''
"""2 processes, DeepSpeed ZeRO-3 (ZERO_STAGE=2: ZeRO-2) on CPU (gloo): one step, a checkpoint, the
gathered live weights."""
import json, os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from safetensors.torch import save_file
from transformers import AutoTokenizer

from mmpretrain.config import load_config, to_dict
from mmpretrain.models import build_model
from mmpretrain.runtime import skip_deepspeed_shm_op
from mmpretrain.trainer.checkpoint import save_checkpoint

out, tok_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config(None, overrides)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": int(os.environ.get("ZERO_STAGE", "3")),
                            "stage3_gather_16bit_weights_on_model_save": True}}
# no GPU: Accelerate picks no backend while DeepSpeed starts gloo -> name gloo explicitly; and
# no C++ build of DeepSpeed's shm inference op (as mmpretrain.runtime.start_accelerator does)
skip_deepspeed_shm_op()
acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
assert acc.num_processes == 2 and acc.distributed_type.name == "DEEPSPEED", (acc.num_processes, acc.distributed_type)
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
model = build_model(cfg.model, cfg.loss, len(tok))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
g = torch.Generator().manual_seed(acc.process_index)
s = cfg.model.image_size
pixels = torch.randn(2, 3, s, s, generator=g)
ids = torch.randint(5, len(tok), (2, cfg.data.max_length), generator=g)
loss = model(pixels, ids, torch.ones_like(ids), torch.arange(2) + 2 * acc.process_index)["loss"]
acc.backward(loss)
opt.step()
meta = {"config": to_dict(cfg), "vocab_size": len(tok), "distributed_type": "DEEPSPEED",
        "zero_stage": int(os.environ.get("ZERO_STAGE", "3")),
        "world_size": acc.num_processes}
ckpt = save_checkpoint(acc, f"{out}/checkpoints", 1, meta, {}, tok)
full = acc.get_state_dict(model)  # collective: gathers the ZeRO-3 partitions
if acc.is_main_process:
    save_file({k: v.float().contiguous() for k, v in full.items()}, f"{out}/live_weights.safetensors")
    print(json.dumps({"checkpoint": str(ckpt)}))
acc.wait_for_everyone()
'''


def _zero_run(stage: int, shards, run):
    """A 2-process ZeRO-``stage`` run of ZERO3_SCRIPT: (checkpoint, live weights file)."""
    script = run.parent / f"zero{stage}_save.py"
    script.write_text(ZERO3_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ZERO_STAGE=str(stage))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(run), str(shards / "tokenizer"), *tiny_overrides(shards, run)]
    proc = _proc.run(cmd, timeout=300, env=env)
    live_file = run / "live_weights.safetensors"
    # DeepSpeed on gloo sometimes aborts at interpreter exit after finishing: judge by the outputs
    assert live_file.is_file(), proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000001"
    assert (ckpt / "pytorch_model").is_dir() and not (ckpt / "model.safetensors").exists()
    return ckpt, live_file


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory):
    return _zero_run(2, shards, tmp_path_factory.mktemp("zero2") / "run")


@pytest.fixture(scope="module")
def zero3_run(shards, tmp_path_factory):
    return _zero_run(3, shards, tmp_path_factory.mktemp("zero3") / "run")


@pytest.mark.distributed
def test_zero3_two_process_checkpoint_exports_the_live_weights(zero3_run, tmp_path):
    from safetensors.torch import load_file

    ckpt, live_file = zero3_run
    out = export_checkpoint(ckpt, tmp_path / "export")
    live, exported = load_file(str(live_file)), load_file(str(out / "model.safetensors"))
    assert set(live) == set(exported)
    for k in live:
        assert torch.equal(live[k].float(), exported[k]), k
    # the step moved the weights away from their initialisation (the comparison is not trivial)
    torch.manual_seed(0)
    from mmpretrain.models import build_model_from_dict

    init = build_model_from_dict(json.loads((out / "config.json").read_text())["model"]).state_dict()
    assert any(not torch.equal(init[k].float(), exported[k]) for k in exported if exported[k].is_floating_point())


@pytest.mark.distributed
def test_zero3_export_equals_the_single_process_export(zero3_run, shards, tmp_path):
    """Issue 10: the 2-process ZeRO-3 checkpoint exports the same files, every standard-library
    form included, as the single-process fp32 checkpoint of the same weights, config and tokenizer."""
    pytest.importorskip("sentence_transformers")
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from mmpretrain.config import load_config
    from mmpretrain.models import build_model
    from mmpretrain.trainer.checkpoint import save_checkpoint

    zero_ckpt, live_file = zero3_run
    single = tmp_path / "single"
    cfg = load_config(None, tiny_overrides(shards, single))
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    model = build_model(cfg.model, cfg.loss, len(tok))
    model.load_state_dict(load_file(str(live_file)), strict=True)
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    meta = {"config": json.loads((zero_ckpt / "mmpretrain.json").read_text())["config"], "vocab_size": len(tok),
            "distributed_type": "NO", "zero_stage": 0, "world_size": 1}
    single_ckpt = save_checkpoint(acc, single / "checkpoints", 1, meta, {}, tok)

    a = export_files(export_checkpoint(zero_ckpt, tmp_path / "a" / "export"))
    b = export_files(export_checkpoint(single_ckpt, tmp_path / "b" / "export"))
    assert {"modules.json", "itm/model.safetensors", "text_encoder/model.safetensors",
            "image_encoder/model.safetensors", "README.md"} <= set(a)
    assert set(a) == set(b) and [k for k in a if a[k] != b[k]] == []


@pytest.mark.distributed
def test_zero2_two_process_checkpoint_exports_the_live_weights(zero2_run, tmp_path):
    """ZeRO-2 partition files (loss scaler, ZeRO stage enum, parameter-slice records) load
    weights_only with export.format's allow-list, and consolidate to the live weights."""
    from safetensors.torch import load_file

    ckpt, live_file = zero2_run
    live, exported = load_file(str(live_file)), load_file(str(export_checkpoint(ckpt, tmp_path / "e") / "model.safetensors"))
    assert set(live) == set(exported) and all(torch.equal(live[k].float(), exported[k]) for k in live)


PAYLOAD = "open({marker!r}, 'w').write('ran')"


class _Planted:
    """Unpickling this runs ``exec`` (what a planted checkpoint file would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.exec, (PAYLOAD.format(marker=self.marker),))


@pytest.mark.distributed
def test_a_planted_pickle_in_a_zero_checkpoint_runs_no_code(zero2_run, tmp_path, monkeypatch, capsys):
    """Every partition file of a ZeRO checkpoint is a pickle that DeepSpeed's zero_to_fp32 loads
    with weights_only=False. A payload planted in any of them is refused by export and eval in one
    line naming the checkpoint's pytorch_model/, and never runs; MMPRETRAIN_TRUST_CHECKPOINT_PICKLE=1
    is the documented way to load a trusted one unrestricted (and then it does run)."""
    import shutil

    from mmpretrain.evaluation import cli as eval_cli
    from mmpretrain.export import main

    src, _ = zero2_run
    monkeypatch.delenv("MMPRETRAIN_TRUST_CHECKPOINT_PICKLE", raising=False)
    files = sorted(p.name for p in (src / "pytorch_model").glob("*.pt"))
    assert any("model_states" in f for f in files) and any("optim_states" in f for f in files), files
    for name in files:
        ckpt = tmp_path / name / "checkpoints" / src.name
        shutil.copytree(src, ckpt)
        marker = tmp_path / name / "ran"
        target = ckpt / "pytorch_model" / name
        state = torch.load(target, map_location="cpu", weights_only=False)  # the test's own file
        state["payload"] = _Planted(str(marker))
        torch.save(state, target)
        capsys.readouterr()
        rc = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / name / "export")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert str(ckpt / "pytorch_model") in err and "weights_only" in err and "exec" in err, err
        assert not marker.exists() and not (tmp_path / name / "export").exists()
        (tmp_path / "none-000000.tar").touch()  # a shard that exists: the checkpoint is what fails
        rc = eval_cli.main(["--checkpoint", str(ckpt), "--shards", str(tmp_path / "none-*.tar"),
                            "--out", str(tmp_path / name / "eval")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "weights_only" in err and not marker.exists(), err
    monkeypatch.setenv("MMPRETRAIN_TRUST_CHECKPOINT_PICKLE", "1")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "trusted")]) == 0
    assert marker.read_text() == "ran"  # the opt-out really is DeepSpeed's unrestricted load
