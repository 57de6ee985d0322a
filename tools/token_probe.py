"""Diagnostic (docs/BENCHMARKS.md, issue 9): what a unified checkpoint's image-tower *tokens*
hold locally. For every image token of the 8x8 grid, the label is the object drawn in the grid
cell (3x3) under the token's centre: its colour (10 + "none") and its shape (8 + "none"). A
linear classifier is fitted on the frozen tokens of training images and scored on held-out
images, for the tower's input embedding (``image_embed``: the stem + position table) and its
output (``image_inputs``: what the fusion blocks read). High accuracy means a fusion can read
"what is where" from single tokens; low means the binding targets wait on the towers.

    python tools/token_probe.py --ckpt RUN/checkpoints/step_00000300 --shards SHARDS [--ntrain 3000]
"""
import argparse, glob, io, json, os, time

import numpy as np, torch, torch.nn as nn
from PIL import Image

from mmpretrain.data.shardio import iter_shard_samples
from mmpretrain.data.synthetic import COLORS, SHAPES
from mmpretrain.export.format import load_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--shards", required=True)
p.add_argument("--ntrain", type=int, default=3000)
p.add_argument("--steps", type=int, default=300)
args = p.parse_args()
torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
L = load_checkpoint(args.ckpt)
model, cfg = L.model.eval(), L.cfg
bb = model.backbone
MEAN, STD = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
CNAMES, SNAMES = list(COLORS), list(SHAPES)


def read(pattern, n):
    out, seen = [], set()
    for f in sorted(glob.glob(pattern)):
        for v in sorted((v for _, v in iter_shard_samples(f)), key=lambda v: v["__key__"]):
            meta = json.loads(v["json"])
            if meta["image_id"] in seen:
                continue
            seen.add(meta["image_id"]); out.append((v["jpg"], meta))
        if len(out) >= n:
            break
    return out[:n]


def labels(meta, grid):
    size = meta.get("width", 64)
    col = torch.full((grid, grid), len(CNAMES)); shp = torch.full((grid, grid), len(SNAMES))
    for o in meta["objects"]:
        for i in range(grid):
            for j in range(grid):
                y, x = (i + 0.5) * size / grid, (j + 0.5) * size / grid
                if int(y // (size / 3)) == o["row"] and int(x // (size / 3)) == o["col"]:
                    col[i, j], shp[i, j] = CNAMES.index(o["color"]), SNAMES.index(o["shape"])
    return col.flatten(), shp.flatten()


@torch.no_grad()
def features(rows):
    s = cfg.model.image_size
    arr = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB").resize((s, s), Image.BICUBIC)) for j, _ in rows])
    px = (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    emb, out = [], []
    for b in range(0, len(px), 256):
        e = bb.image_embed(px[b:b + 256]); emb.append(e); out.append(bb.image_inputs(px[b:b + 256]))
    emb, out = torch.cat(emb), torch.cat(out)
    n = emb.shape[1]; grid = int(round((n - (n % 2 == 1)) ** 0.5))
    skip = n - grid * grid  # a [CLS] first
    lab = [labels(m, grid) for _, m in rows]
    col = torch.stack([c for c, _ in lab]); shp = torch.stack([s for _, s in lab])
    return emb[:, skip:], out[:, skip:], col, shp


def fit(xtr, ytr, xva, yva, k):
    xtr, xva = xtr.reshape(-1, xtr.shape[-1]), xva.reshape(-1, xva.shape[-1])
    ytr, yva = ytr.reshape(-1), yva.reshape(-1)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    lin = nn.Linear(xtr.shape[1], k + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(args.steps):
        idx = torch.randint(0, len(xtr), (8192,))
        loss = nn.functional.cross_entropy(lin(xtr[idx]), ytr[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        pred = lin(xva).argmax(-1)
    obj = yva != k
    return round(float((pred[obj] == yva[obj]).float().mean()), 3), round(float((pred[~obj] == k).float().mean()), 3)


t0 = time.time()
tr, va = read(args.shards + "/train-*.tar", args.ntrain), read(args.shards + "/val-*.tar", 1000)
etr, otr, ctr, str_ = features(tr)
eva, ova, cva, sva = features(va)
print(f"tokens {tuple(otr.shape)}, {time.time() - t0:.0f}s", flush=True)
res = {}
for name, xtr, xva in (("input_embedding", etr, eva), ("tower_output", otr, ova)):
    for what, ytr, yva, k in (("colour", ctr, cva, len(CNAMES)), ("shape", str_, sva, len(SNAMES))):
        acc_obj, acc_none = fit(xtr, ytr, xva, yva, k)
        res[f"{name}/{what}"] = {"on_object": acc_obj, "empty_cell": acc_none}
        print(name, what, "held-out accuracy on object tokens", acc_obj, "| empty-cell tokens called empty", acc_none,
              flush=True)
print(json.dumps({"ckpt": args.ckpt, "ntrain": len(tr), "chance_colour": 0.1, "chance_shape": 0.125, **res}))
