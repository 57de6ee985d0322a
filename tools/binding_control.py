"""Binding control: can a small transformer trained from scratch learn the binding kinds at all?

The control for tools/fusion_probe.py (docs/BENCHMARKS.md "Fourteenth pass"). No image and no
checkpoint: every object of a synthetic scene becomes one token (learned embeddings of its
colour, shape and size from the scene json plus a linear map of its centre), the background one
more; the caption is the shards' own tokenizer's ids through a learned word and position
embedding. A fresh transformer (``--layers`` pre-norm blocks, width ``--width``) reads
``[CLS; objects; words]`` and its [CLS] gives the match logit. Training is the probe's ITM on the
same 20,000 scenes and the same word negatives (``mmpretrain.word_negatives``, ``--kinds``,
share 1.0; rows without an applicable change take a random caption) plus a random scene per row;
every ``--eval-every`` steps it prints the held-out compositional pairwise accuracy per change
kind (``mmpretrain.evaluation.compositional.make_variants``, the eval's test; chance 0.5).

``--negatives plan`` trains on the test's own kind of change instead (each training scene's
changed captions from its caption plan: colour and size swaps, relation flips), which a user's
data does not have, to tell the supervision's form from its content.

If this learns the binding kinds, the supervision and data can teach binding, and what the
fusion probe lacks is in its inputs (patch tokens), its initialisation or its budget; if it does
not, the supervision is the block.

    python tools/binding_control.py --shards shards/synthetic --steps 4000
"""
import argparse, glob, json, os, time

import torch, torch.nn as nn, torch.nn.functional as F
from transformers import AutoTokenizer

from mmpretrain.data.shardio import iter_shard_samples
from mmpretrain.data import synthetic
from mmpretrain.data.tokenizer import tokenize
from mmpretrain.evaluation.compositional import KINDS, make_variants
from mmpretrain.word_negatives import build_table, load_word_sets, word_negatives

p = argparse.ArgumentParser()
p.add_argument("--shards", default="shards/synthetic", help="synthetic shards (train-*.tar, val-*.tar, tokenizer/)")
p.add_argument("--steps", type=int, default=4000)
p.add_argument("--bs", type=int, default=128)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--width", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--kinds", default="swap,flip", help="word-negative kinds trained on (swap, replace, flip)")
p.add_argument("--negatives", default="words", choices=["words", "plan", "scene"],
               help="words: mmpretrain.word_negatives on the token ids (what the trainer uses); plan: the "
                    "compositional test's own changed captions of each training scene (make_variants, kinds "
                    "--plan-kinds), false by construction; scene: the row's own caption with a changed scene "
                    "(two of its objects trade colours, sizes or places), so no text-only cue tells it apart")
p.add_argument("--plan-kinds", default="color_swap,size_swap,relation_flip")
p.add_argument("--eval-every", type=int, default=500)
p.add_argument("--max-length", type=int, default=32)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed); torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
tok = AutoTokenizer.from_pretrained(os.path.join(args.shards, "tokenizer"))
MAX_OBJ = 4
COLORS, SHAPES, SIZES, BACKGROUNDS = (list(d) for d in (synthetic.COLORS, synthetic.SHAPES, synthetic.SIZES,
                                                          synthetic.BACKGROUNDS))


def read(pattern):
    out = []
    for f in sorted(glob.glob(pattern)):
        for _, v in iter_shard_samples(f):
            out.append((v["__key__"], v["txt"].decode(), json.loads(v["json"])))
    return out


def scene_tensors(metas):
    """Per scene: object attribute ids [N, 4, 3], centres [N, 4, 2] in [0, 1], mask [N, 4], background [N]."""
    n = len(metas)
    attr, ctr, mask = torch.zeros(n, MAX_OBJ, 3, dtype=torch.long), torch.zeros(n, MAX_OBJ, 2), torch.zeros(n, MAX_OBJ, dtype=torch.bool)
    bg = torch.tensor([BACKGROUNDS.index(m["background"]) for m in metas])
    for i, m in enumerate(metas):
        for j, o in enumerate(m["objects"][:MAX_OBJ]):
            attr[i, j] = torch.tensor([COLORS.index(o["color"]), SHAPES.index(o["shape"]), SIZES.index(o["size"])])
            ctr[i, j] = torch.tensor(o["center"]) / 64.0
            mask[i, j] = True
    return attr, ctr, mask, bg


class Control(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, length: int):
        super().__init__()
        self.color, self.shape, self.size = nn.Embedding(len(COLORS), d), nn.Embedding(len(SHAPES), d), nn.Embedding(len(SIZES), d)
        self.bg, self.where = nn.Embedding(len(BACKGROUNDS), d), nn.Linear(2, d)
        self.word, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(length, d) * 0.02)
        self.kind = nn.Parameter(torch.randn(3, d) * 0.02)  # [CLS], object, word type embeddings
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        block = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 1)

    def forward(self, attr, ctr, omask, bg, ids, am):
        b = ids.shape[0]
        obj = self.color(attr[..., 0]) + self.shape(attr[..., 1]) + self.size(attr[..., 2]) + self.where(ctr) + self.kind[1]
        obj = torch.cat([self.bg(bg)[:, None] + self.kind[1], obj], 1)
        words = self.word(ids) + self.pos[: ids.shape[1]] + self.kind[2]
        x = torch.cat([self.cls.expand(b, -1, -1) + self.kind[0], obj, words], 1)
        keep = torch.cat([torch.ones(b, 2, dtype=torch.bool), omask, am.bool()], 1)
        x = self.blocks(x, src_key_padding_mask=~keep)
        return self.head(self.norm(x[:, 0])).squeeze(-1)


t0 = time.time()
tr, va = read(os.path.join(args.shards, "train-*.tar")), read(os.path.join(args.shards, "val-*.tar"))
TR = scene_tensors([r[2] for r in tr]); TRT = tokenize(tok, [r[1] for r in tr], args.max_length)
seen, vrows = set(), []
for k, cap, meta in va:
    if meta["image_id"] not in seen:
        seen.add(meta["image_id"]); vrows.append((k, cap, meta))
VA = scene_tensors([r[2] for r in vrows])
trials = [(i, kind, cap, text) for i, (k, cap, meta) in enumerate(vrows) for kind, text in make_variants(meta, k).items()]
kinds = set(args.kinds.split(","))
table = build_table({k: v for k, v in load_word_sets("synthetic").items() if k in kinds}, tok)
if args.negatives == "plan":  # per training scene: its changed captions of the chosen kinds
    plan_kinds = args.plan_kinds.split(",")
    changed = [[v for kd, v in make_variants(meta, k).items() if kd in plan_kinds] for k, cap, meta in tr]
    owner = torch.tensor([i for i, c in enumerate(changed) for _ in c])
    PT = tokenize(tok, [v for c in changed for v in c], args.max_length)
    first = torch.zeros(len(tr) + 1, dtype=torch.long)
    first[1:] = torch.cumsum(torch.tensor([len(c) for c in changed]), 0)
    print("plan negatives", len(owner), "of", len(tr), "scenes have one", flush=True)
model = Control(len(tok), args.width, args.layers, args.max_length)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
print("data", len(tr), len(vrows), len(trials), "params", sum(q.numel() for q in model.parameters()), f"{time.time() - t0:.0f}s", flush=True)


def rows(t, idx):
    return [x[idx] for x in t]


@torch.no_grad()
def evaluate():
    model.eval()
    idx = torch.tensor([t[0] for t in trials])
    tt, tc = tokenize(tok, [t[2] for t in trials], args.max_length), tokenize(tok, [t[3] for t in trials], args.max_length)
    st = model(*rows(VA, idx), tt["input_ids"], tt["attention_mask"])
    sc = model(*rows(VA, idx), tc["input_ids"], tc["attention_mask"])
    res = {kind: round(float(((st > sc).float() + 0.5 * (st == sc).float())[torch.tensor([t[1] == kind for t in trials])].mean()), 3)
           for kind in KINDS}
    vt = tokenize(tok, [r[1] for r in vrows], args.max_length)
    perm = torch.roll(torch.arange(len(vrows)), 1)
    sp = model(*VA, vt["input_ids"], vt["attention_mask"])
    sn = model(*VA, vt["input_ids"][perm], vt["attention_mask"][perm])
    res["pos>rand"] = round(float((sp > sn).float().mean()), 3)
    model.train()
    return res


g = torch.Generator().manual_seed(args.seed)
for step in range(1, args.steps + 1):
    idx = torch.randint(len(tr), (args.bs,), generator=g)
    ids, am = TRT["input_ids"][idx], TRT["attention_mask"][idx]
    if args.negatives == "scene":  # the same caption, two objects of the scene trading one attribute
        scene = rows(TR, idx)
        attr, ctr = scene[0].clone(), scene[1].clone()
        n_obj = scene[2].sum(1)
        w_rows = n_obj >= 2
        a = (torch.rand(args.bs, generator=g) * n_obj.clamp(min=1)).long().clamp(max=(n_obj - 1).clamp(min=0))
        b = (a + 1 + (torch.rand(args.bs, generator=g) * (n_obj - 1).clamp(min=1)).long()) % n_obj.clamp(min=1)
        what = torch.randint(3, (args.bs,), generator=g)  # 0 colour, 1 size, 2 place
        r = torch.arange(args.bs)
        for k, col in ((0, 0), (1, 2)):
            m = w_rows & (what == k)
            va_, vb_ = attr[r, a, col].clone(), attr[r, b, col].clone()
            attr[r[m], a[m], col], attr[r[m], b[m], col] = vb_[m], va_[m]
        m = w_rows & (what == 2)
        ca, cb = ctr[r, a].clone(), ctr[r, b].clone()
        ctr[r[m], a[m]], ctr[r[m], b[m]] = cb[m], ca[m]
        rnd = torch.roll(torch.arange(args.bs), 1)  # rows without two objects: a random scene instead
        neg_scene = [torch.where(w_rows.view(-1, *([1] * (x.dim() - 1))), y, x[rnd]) for x, y in
                     zip(scene, (attr, ctr, scene[2], scene[3]))]
        s = model(*[torch.cat([x, n, x[rnd]]) for x, n in zip(scene, neg_scene)], torch.cat([ids, ids, ids]),
                  torch.cat([am, am, am]))
    elif args.negatives == "plan":  # one of the scene's changed captions, where it has one
        count = first[idx + 1] - first[idx]
        w_rows = count > 0
        pick = first[idx] + (torch.rand(args.bs, generator=g) * count.clamp(min=1)).long().clamp(max=(count - 1).clamp(min=0))
        pick = torch.where(w_rows, pick, torch.zeros_like(pick))
        w_ids = torch.where(w_rows[:, None], PT["input_ids"][pick], ids)
        am_w = torch.where(w_rows[:, None], PT["attention_mask"][pick], am)
    else:
        w_ids, w_rows = word_negatives(ids, am, table, 1.0, g)
        am_w = am
    if args.negatives != "scene":
        rnd = torch.roll(torch.arange(args.bs), 1)
        neg_ids, neg_am = torch.where(w_rows[:, None], w_ids, ids[rnd]), torch.where(w_rows[:, None], am_w, am[rnd])
        scene = rows(TR, idx)
        s = model(*[torch.cat([x, x, x[rnd]]) for x in scene], torch.cat([ids, neg_ids, ids]), torch.cat([am, neg_am, am]))
    y = torch.cat([torch.ones(args.bs), torch.zeros(2 * args.bs)])
    loss = F.binary_cross_entropy_with_logits(s, y)
    for gr in opt.param_groups:
        gr["lr"] = args.lr * min(1.0, step / 100)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        acc = float(((s > 0).float() == y).float().mean())
        print(step, f"{time.time() - t0:.0f}s loss {loss.item():.3f} acc {acc:.3f} word-negative share {w_rows.float().mean():.2f}", flush=True)
    if step % args.eval_every == 0:
        print("EVAL", step, json.dumps(evaluate()), flush=True)
