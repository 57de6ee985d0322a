"""Perception probe: how fast can an image tower learn to name the one shape in an image when it
is told the answer? Supervised shape classification from scratch on the synthetic labelled split
(``mmpretrain shards synthetic --num-classify N`` writes ``DIR/classify/``; label = the shape,
8 classes), the first ``N - 1000`` images for training and the last 1,000 held out. It separates
"the objective never asks for it" from "this tower cannot learn it at this budget"
(docs/BENCHMARKS.md "Fifth pass").

    mmpretrain shards synthetic --out /tmp/cls6k --num-samples 1 --num-val 0 --no-tokenizer --num-classify 6000
    python tools/perception_probe.py --data /tmp/cls6k/classify --tower resnet --steps 300

Towers: ``patch`` / ``resnet`` (the unified model's image path: ``model.image_stem``, 4 blocks of
width 128, mean-pooled tokens), ``conv3`` / ``conv5`` (3x3 convolution stems with GroupNorm in
front of the same blocks, stride 8 in 3 or 5 layers), ``small_cnn`` (the dual encoder's 4 strided
convolutions, no transformer). AdamW, lr 1e-3 (30 warm-up steps), batch 64, one seed. Prints the
held-out top-1 every 100 steps. ``--pool``: how the tokens reach the classifier (mean, as the
fifth pass measured; max, ``model.image_pool=max``; [CLS]) — the sixth pass's finding.
"""
import argparse
import glob
import io
import json
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from mmpretrain.models.config import ModelConfig
from mmpretrain.models.dual_encoder import SmallCNN
from mmpretrain.models.unified import UnifiedTransformer

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data", required=True, help="the labelled split (DIR/classify of mmpretrain shards synthetic)")
p.add_argument("--tower", default="resnet", choices=["patch", "resnet", "conv3", "conv5", "small_cnn"])
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--field", default="label", help="sample-json field of the class (label = shape, color)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--pool", default="mean", choices=["mean", "max", "cls"],
               help="read-out of the tokens into the classifier (model.image_pool): mean, channel-wise max, [CLS]")
args = p.parse_args()
torch.set_num_threads(2)
torch.manual_seed(args.seed)

rows = []
for f in sorted(glob.glob(f"{args.data}/*.tar")):
    with tarfile.open(f) as tf:
        cur: dict = {}
        for m in tf:
            key, ext = m.name.split(".", 1)
            cur.setdefault(key, {})[ext] = tf.extractfile(m).read()
        rows += [(v["jpg"], json.loads(v["json"])[args.field]) for v in cur.values()]
if len(rows) < 2000:
    raise SystemExit(f"{args.data}: {len(rows)} images; the probe needs at least 2,000 (--num-classify 6000)")
x = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB").resize((64, 64)))
                               for j, _ in rows])).permute(0, 3, 1, 2).float() / 255
x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
classes = sorted({c for _, c in rows})
y = torch.tensor([classes.index(c) for _, c in rows])
held = torch.arange(len(y)) >= len(y) - 1000


class ConvStem(nn.Module):
    def __init__(self, chans, strides, width, n):
        super().__init__()
        mods = []
        for cin, cout, st in zip(chans[:-1], chans[1:], strides):
            mods += [nn.Conv2d(cin, cout, 3, stride=st, padding=1, bias=False), nn.GroupNorm(min(32, cout // 4), cout),
                     nn.ReLU()]
        self.net = nn.Sequential(*mods, nn.Conv2d(chans[-1], width, 1))
        self.num_patches = n

    def forward(self, t):
        return self.net(t).flatten(2).transpose(1, 2)


if args.tower == "small_cnn":
    cnn = SmallCNN(128)
    encode = lambda t: cnn.forward_features(t).flatten(2).transpose(1, 2)  # noqa: E731
    params = list(cnn.parameters())
else:
    m = UnifiedTransformer(ModelConfig(image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                                       image_stem="resnet" if args.tower == "resnet" else "patch"), 1000)
    if args.tower == "conv3":
        m.image_embed.patch_embed = ConvStem([3, 32, 64, 128], [2, 2, 2], 128, 64)
    elif args.tower == "conv5":
        m.image_embed.patch_embed = ConvStem([3, 32, 64, 64, 128, 128], [2, 1, 2, 1, 2], 128, 64)
    encode = lambda t: m.encode_image(t)[0]  # noqa: E731
    params = list(m.image_embed.parameters()) + list(m.blocks.parameters()) + list(m.norm.parameters())
head = nn.Linear(128, len(classes))


def pool(tokens):
    if args.pool == "max":
        return tokens.amax(1)
    if args.pool == "cls" and args.tower != "small_cnn":
        return tokens[:, 0]
    return tokens.mean(1)



opt = torch.optim.AdamW(params + list(head.parameters()), lr=args.lr, weight_decay=0.05)
g = torch.Generator().manual_seed(args.seed)
t0 = time.time()
n_train = int((~held).sum())
for step in range(1, args.steps + 1):
    idx = torch.randint(n_train, (64,), generator=g)
    loss = F.cross_entropy(head(pool(encode(x[idx]))), y[idx])
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, step / 30)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0 or step == args.steps:
        with torch.no_grad():
            acc = float((head(pool(encode(x[held]))).argmax(1) == y[held]).float().mean())
        print(json.dumps({"tower": args.tower, "pool": args.pool, "step": step, "train_loss": round(loss.item(), 3),
                          "heldout_top1": round(acc, 3), "chance": round(1 / len(classes), 3),
                          "seconds": round(time.time() - t0, 1)}), flush=True)
