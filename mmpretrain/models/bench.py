"""`mmpretrain bench model [--config tiny|vilt_b32] [--batch N] [--steps N] [--arch ...]`

Forward+backward time per sample on CPU (fp32), and the share of a step spent in the
embedding gathers and in ITM hard-negative mining (similarities, sampling, fetching the chosen
rows) measured by ``RegionTimers``, which wraps the model's ``gather_embeddings`` and
``mine_itm_negatives`` for the run (the model itself has no timers). With CUDA available it also measures bf16
(autocast) samples/s and MFU against the H100 dense bf16 peak (989 TFLOP/s). Run under torchrun
the gathers and exchanges are real (a gloo process group from ``mmpretrain.runtime``, ended at
exit); in one process they are identities.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from mmpretrain import runtime as rt
from mmpretrain.models import LossConfig, ModelConfig, build_model
from mmpretrain.models.flops import count_params, training_flops_per_sample

H100_BF16_PEAK = 989e12

PRESETS = {
    "tiny": (dict(), 32, 4096, 16),
    "vilt_b32": (dict(image_size=224, patch_size=32, width=768, depth=12, num_heads=12, embed_dim=256,
                      max_text_length=40), 40, 30522, 4),
}


def _batch(b, cfg, text_len, vocab, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
    ids = torch.randint(1, vocab, (b, text_len), generator=g).to(device)
    mask = torch.ones(b, text_len, dtype=torch.long, device=device)
    mask[: b // 2, text_len * 3 // 4:] = 0
    return px, ids, mask, torch.arange(b, device=device)


class RegionTimers:
    """Seconds spent in the model's embedding gathers ('gather') and ITM hard-negative mining
    ('itm_mining'): ``install(model)`` wraps those two methods of that one instance (with
    ``cuda.synchronize`` before and after each call when CUDA is available), ``remove(model)``
    restores them. ``seconds`` accumulates until it is cleared."""

    REGIONS = {"gather": "gather_embeddings", "itm_mining": "mine_itm_negatives"}

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def install(self, model) -> None:
        for region, method in self.REGIONS.items():
            setattr(model, method, self._timed(region, getattr(model, method)))

    def remove(self, model) -> None:
        for method in self.REGIONS.values():
            model.__dict__.pop(method, None)

    def _timed(self, region: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[region] = self.seconds.get(region, 0.0) + time.perf_counter() - t0
            return out
        return timed


def _run(model, batch, steps, device, autocast_dtype=None):
    times, timers = [], {}
    regions = RegionTimers()
    regions.install(model)
    for i in range(steps + 1):  # first step is warm-up
        regions.seconds = {}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(*batch)
        out["loss"].backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
            for k, v in regions.seconds.items():
                timers[k] = timers.get(k, 0.0) + v
    regions.remove(model)
    step = sum(times) / len(times)
    return step, {k: v / len(times) / step for k, v in timers.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmpretrain bench model", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="batch for the CPU run (default: preset)")
    ap.add_argument("--gpu-batch", type=int, default=None, help="batch for the CUDA bf16 run")
    ap.add_argument("--skip-cpu", action="store_true", help="only the CUDA measurement")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--arch", choices=["unified", "dual_encoder"], default="unified")
    ap.add_argument("--experts", action="store_true", help="VLMo modality experts")
    ap.add_argument("--no-itm", action="store_true", help="InfoNCE only")
    args = ap.parse_args(argv)

    # under torchrun: real gloo collectives, so the gather share is measured
    with rt.start_process_group("gloo") as runtime:
        return _bench(args, runtime)


def _bench(args, runtime: rt.Runtime) -> int:
    world = runtime.world_size
    log = print if runtime.is_main else (lambda *a, **k: None)  # one report, from rank 0
    over, text_len, vocab, default_b = PRESETS[args.config]
    cfg = ModelConfig(arch=args.arch, modality_experts=args.experts, **over)
    lcfg = LossConfig(itm_weight=0.0 if args.no_itm else 1.0)
    b = args.batch or default_b
    torch.manual_seed(0)
    model = build_model(cfg, lcfg, vocab).train()
    flops = training_flops_per_sample(cfg, lcfg, text_len)
    log(f"model {args.config} arch={args.arch} experts={args.experts} params={count_params(model) / 1e6:.1f}M "
          f"train FLOPs/sample={flops / 1e9:.2f} GFLOP batch={b} text_len={text_len} "
          f"threads={torch.get_num_threads()} world={world} (batch is per rank)")

    cpu = torch.device("cpu")
    if not args.skip_cpu:
        step, shares = _run(model, _batch(b, cfg, text_len, vocab, cpu), args.steps, cpu)
        log(f"cpu fp32: {step / b * 1e3:.1f} ms/sample fwd+bwd ({step:.3f} s/step), "
              f"{flops * b / step / 1e9:.1f} GFLOP/s; share of step: gather {shares.get('gather', 0) * 100:.2f}%, "
              f"itm mining {shares.get('itm_mining', 0) * 100:.2f}%")

    if torch.cuda.is_available() and world == 1:
        dev = torch.device("cuda")
        model = model.to(dev)
        gb = args.gpu_batch or (256 if args.config == "vilt_b32" else 512)
        step, shares = _run(model, _batch(gb, cfg, text_len, vocab, dev), args.steps, dev, torch.bfloat16)
        sps = gb / step
        log(f"cuda bf16 autocast: {sps:.0f} samples/s (batch {gb}), MFU {flops * sps / H100_BF16_PEAK * 100:.1f}% "
              f"of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s; share of step: gather {shares.get('gather', 0) * 100:.2f}%, "
              f"itm mining {shares.get('itm_mining', 0) * 100:.2f}%  [{torch.cuda.get_device_name()}]")
    else:
        log("cuda: not available (bf16 samples/s and MFU not measured)")
    return 0
