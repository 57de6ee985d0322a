"""Fusion probe: can the fusion blocks learn binding over a trained checkpoint's towers?

The towers of CKPT (``model.fusion_source: towers``) are frozen and their tokens computed once
for the training images (centre crop); the fusion blocks and the ITM head (optionally re-
initialised, or a new fusion depth) are trained on ITM alone: each row's positive, its own
caption with one word changed (``mmpretrain.word_negatives``, share ``--wn``) or a random caption,
and a random image. ``--rtd W`` adds a replaced-word loss on the fused text tokens (a per-token
head told which tokens the change touched). Every ``--eval-every`` steps it prints the held-out
compositional pairwise accuracy per change kind (``mmpretrain.evaluation.compositional``) by the
ITM log-odds and by the replaced-word score, and the accuracy against a random caption
(docs/BENCHMARKS.md "Fifth pass").

``--fuse none --readout model --head late`` skips the fusion blocks: the late head scores the
towers' own tokens (each text token against its best image token), so binding can only come
from what the text side puts in each word's token (docs/BENCHMARKS.md "Fourteenth pass").

``--oracle`` replaces the image tower's tokens by perfect ones read off the scene in each sample's
json: the token of a grid patch whose centre lies on an object is the sum of fixed random
embeddings of that object's colour, shape and size, any other patch's token that of the
background colour and texture, plus a fixed random embedding of the patch position; [CLS] is
their mean; LayerNorm, then scaled to the towers' mean token norm. Every binding fact is then
in the tokens, so what the fusion still cannot learn is the fusion's limit, not perception's
(docs/BENCHMARKS.md "Twelfth pass").

    python tools/fusion_probe.py --ckpt runs/tiny/checkpoints/step_00000900 --steps 300 --rtd 1
"""
import argparse, copy, glob, io, json, os, random, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from mmpretrain.export.format import load_checkpoint
from mmpretrain.data.shardio import iter_shard_samples
from mmpretrain.data.tokenizer import tokenize
from mmpretrain.evaluation.compositional import make_variants, KINDS
from mmpretrain.word_negatives import build_table, load_word_sets, word_negatives
import mmpretrain.models.layers as Lx

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True, help="a checkpoint of a unified model with fusion_source=towers")
p.add_argument("--shards", default="shards/synthetic", help="the synthetic shards (train-*.tar, val-*.tar)")
p.add_argument("--cache", default="", help="file to keep the frozen towers' tokens in between runs")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--train", default="fusion", choices=["fusion", "text", "all"],
               help="train the fusion only; the fusion and the text side (the shared stack through the text only: the "
                    "image tokens stay the checkpoint's, or the oracle's); or everything")
p.add_argument("--reinit", action="store_true", help="re-initialise fusion blocks + head")
p.add_argument("--depth", type=int, default=0, help="new fusion depth (implies reinit)")
p.add_argument("--wn", type=float, default=1.0, help="share of rows with a word negative")
p.add_argument("--eval-every", type=int, default=150)
p.add_argument("--ntrain", type=int, default=20000)
p.add_argument("--rtd", type=float, default=0.0, help="weight of the per-token replaced-word loss")
p.add_argument("--kinds", default="swap,replace,flip",
               help="word-negative kinds to train on (comma-separated; e.g. swap,flip: binding changes only)")
p.add_argument("--oracle", action="store_true", help="perfect image tokens from the scene json (see above)")
p.add_argument("--head", default="", choices=["", "match", "late"],
               help="with --readout model: a fresh ITM head of this kind (model.itm_head) instead of the checkpoint's")
p.add_argument("--readout", default="cls", help="cls | mean (mean over fused text tokens) | model (the checkpoint's ITM head)")
p.add_argument("--fuse", default="blocks", choices=["blocks", "none"],
               help="none (with --readout model --head late): no fusion blocks; the late head scores the towers' "
                    "own image and text tokens (FILIP-style; with --train text the text side learns what to carry)")
args = p.parse_args()
if args.oracle and args.train == "all":
    p.error("--oracle replaces the image tower: use it with --train fusion")
if args.fuse == "none" and (args.readout != "model" or args.head != "late"):
    p.error("--fuse none scores unfused tokens token by token: use it with --readout model --head late")
torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
L = load_checkpoint(args.ckpt)
model, tok, cfg = L.model, L.tokenizer, L.cfg
bb = model.backbone
if args.depth:
    bb.fusion_blocks = nn.ModuleList(Lx.Block(bb.cfg.width, bb.cfg.num_heads, bb.cfg.mlp_ratio, 0.0) for _ in range(args.depth))
    bb.cfg.fusion_depth = args.depth
    args.reinit = True
if args.head:  # a fresh match / late head, as the model builds it (starts as logit_scale_init x cosine)
    bb.cfg.itm_head = args.head
    bb.itm_match = {"match": Lx.MatchHead, "late": Lx.LateMatchHead}[args.head](bb.cfg.embed_dim, bb.cfg.logit_scale_init)
if args.readout != "model" and bb.itm_head is None:  # a match-head checkpoint: a new pooler head for cls/mean
    bb.itm_head = Lx.ItmHead(bb.cfg.width); Lx.init_weights(bb.itm_head)
if args.reinit:
    Lx.init_weights(bb.fusion_blocks); Lx.init_weights(bb.fusion_norm)
    if bb.itm_head is not None: Lx.init_weights(bb.itm_head)
MEAN, STD = torch.tensor(cfg.data.mean).view(3,1,1), torch.tensor(cfg.data.std).view(3,1,1)

def read(pattern, n=None):
    out = []
    for f in sorted(glob.glob(pattern)):
        for _, v in iter_shard_samples(f):
            out.append((v["__key__"], v["jpg"], v["txt"].decode(), json.loads(v["json"])))
        if n and len(out) >= n: break
    return out[:n] if n else out

def pix(jpgs):
    arr = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB").resize((64, 64), Image.BICUBIC)) for j in jpgs])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD

t0 = time.time()
tr = read(args.shards + "/train-*.tar", args.ntrain)
va = read(args.shards + "/val-*.tar")
TRP = pix([r[1] for r in tr]); TRT = tokenize(tok, [r[2] for r in tr], 32)
# held-out: one caption per image (first), its variants
seen = set(); vrows = []
for k, j, cap, meta in va:
    if meta["image_id"] in seen: continue
    seen.add(meta["image_id"]); vrows.append((k, j, cap, meta))
VP = pix([r[1] for r in vrows])
trials = []  # (img idx, kind, true, changed)
for i, (k, j, cap, meta) in enumerate(vrows):
    for kind, text in make_variants(meta, k).items():
        trials.append((i, kind, cap, text))

def oracle_tokens(metas, ref_norm):
    """[N, 1 + 64, width] perfect image tokens of the scenes ``metas`` (``--oracle``)."""
    from mmpretrain.data.synthetic import BACKGROUNDS, COLORS, SHAPES, SIZES, TEXTURES
    gen, width, grid = torch.Generator().manual_seed(123), bb.cfg.width, 64 // bb.cfg.patch_size
    emb = {name: dict(zip(names, torch.randn(len(names), width, generator=gen)))
           for name, names in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("background", BACKGROUNDS),
                               ("texture", TEXTURES))}
    pos = torch.randn(grid * grid, width, generator=gen)
    out = torch.zeros(len(metas), 1 + grid * grid, width)
    half = 32 / grid  # half a patch, in the 64 px scene coordinates
    for n, m in enumerate(metas):
        for cell in range(grid * grid):
            y, x = (cell // grid * 2 + 1) * half, (cell % grid * 2 + 1) * half
            v = emb["background"][m["background"]] + emb["texture"][m["texture"]]
            for o in m["objects"]:
                if (x - o["center"][0]) ** 2 + (y - o["center"][1]) ** 2 <= (o["radius"] + 2) ** 2:
                    v = emb["color"][o["color"]] + emb["shape"][o["shape"]] + emb["size"][o["size"]]
            out[n, 1 + cell] = v + pos[cell]
        out[n, 0] = out[n, 1:].mean(0)
    out = F.layer_norm(out, (width,))
    return out * (ref_norm / out.norm(dim=-1).mean())

print("data", len(tr), len(vrows), len(trials), f"{time.time()-t0:.0f}s", flush=True)
kinds = set(args.kinds.split(","))
if not kinds <= {"swap", "replace", "flip"}:
    raise SystemExit(f"--kinds: {args.kinds!r}: each must be swap, replace or flip")
table = build_table({k: v for k, v in load_word_sets("synthetic").items() if k in kinds}, tok)

rtd_head = nn.Linear(bb.cfg.width, 1)
TOK = {}
def itm_score(px, ids, am, grad=False, xi=None, xt=None):
    with torch.set_grad_enabled(grad and args.train != "fusion"):
        if xi is None: xi = bb.image_inputs(px)
        if xt is None: xt = bb.text_inputs(ids, am)
    with torch.set_grad_enabled(grad):
        if args.fuse == "none":  # the late head on the unfused tokens (no prior: binding is all it can add)
            lg = bb.itm_match(bb.image_proj(xi), bb.text_proj(xt), am).float()
            TOK["rtd"] = rtd_head(xt).squeeze(-1)
            return lg[:, 1] - lg[:, 0]
        if args.readout == "model":  # the checkpoint's own ITM head (match / late / pooler, with its prior)
            lg = model.itm_from_inputs(xi, xt, am)
            TOK["rtd"] = rtd_head(xt).squeeze(-1)
            return lg[:, 1] - lg[:, 0]
        toks = bb.fuse_tokens(xi, xt, am)
        n = xi.shape[1]
        if args.readout == "mean":
            m = am.float().unsqueeze(-1); r = (toks[:, n:] * m).sum(1) / m.sum(1)
        else:
            r = toks[:, n]
        lg = bb.itm_logits_from_fused(r)
        TOK["rtd"] = rtd_head(toks[:, n:]).squeeze(-1)  # [B, L] replaced-word logits
    return lg[:, 1] - lg[:, 0]

@torch.no_grad()
def evaluate():
    model.eval()
    res = {}
    tt = tokenize(tok, [t[2] for t in trials], 32); tc = tokenize(tok, [t[3] for t in trials], 32)
    idx = torch.tensor([t[0] for t in trials])
    st, sc, rt, rc = [], [], [], []
    mx = lambda am: -(TOK["rtd"].masked_fill(am == 0, -1e4).max(1).values)
    for s in range(0, len(trials), 256):
        sl = slice(s, s + 256)
        ox = VO[idx[sl]] if args.oracle else None
        st.append(itm_score(VP[idx[sl]], tt["input_ids"][sl], tt["attention_mask"][sl], xi=ox)); rt.append(mx(tt["attention_mask"][sl]))
        sc.append(itm_score(VP[idx[sl]], tc["input_ids"][sl], tc["attention_mask"][sl], xi=ox)); rc.append(mx(tc["attention_mask"][sl]))
    st, sc, rt, rc = torch.cat(st), torch.cat(sc), torch.cat(rt), torch.cat(rc)
    for kind in KINDS:
        m = torch.tensor([t[1] == kind for t in trials])
        res["rtd_" + kind] = round(float((rt[m] > rc[m]).float().mean()), 3)
    for kind in KINDS:
        m = torch.tensor([t[1] == kind for t in trials])
        res[kind] = round(float((st[m] > sc[m]).float().mean()), 3)
    # random-caption negative accuracy
    perm = torch.roll(torch.arange(len(vrows)), 1)
    vt = tokenize(tok, [r[2] for r in vrows], 32)
    ox = VO if args.oracle else None
    sp = itm_score(VP, vt["input_ids"], vt["attention_mask"], xi=ox)
    sn = itm_score(VP, vt["input_ids"][perm], vt["attention_mask"][perm], xi=ox)
    res["pos>rand"] = round(float((sp > sn).float().mean()), 3)
    model.train()
    return res

model.rtd_head = rtd_head
TEXT_SIDE = ("backbone.text_embed", "backbone.blocks", "backbone.norm")
params = [p for n, p in model.named_parameters() if args.train == "all" or n.startswith("backbone.fusion") or n.startswith("backbone.itm_") or n.startswith("rtd_head")
          or (args.train == "text" and n.startswith(TEXT_SIDE))]
for p_ in model.parameters(): p_.requires_grad_(False)
for p_ in params: p_.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
print("trainable", sum(p_.numel() for p_ in params), "eval@0", None if args.oracle else evaluate(), flush=True)
g = torch.Generator().manual_seed(0)
model.train()
if args.train in ("fusion", "text"):  # frozen image tower (or text tower too): their tokens once
    import os
    cache = args.cache
    if cache and os.path.exists(cache):
        TI, TT = torch.load(cache)
    else:
      with torch.no_grad():
        TI = torch.cat([bb.image_inputs(TRP[s:s+500]) for s in range(0, len(TRP), 500)])
        TT = torch.cat([bb.text_inputs(TRT["input_ids"][s:s+500], TRT["attention_mask"][s:s+500]) for s in range(0, len(TRP), 500)])
      if cache:
          torch.save((TI, TT), cache)
    if args.oracle:  # scaled to the mean norm of the towers' tokens of the training images
        TO, VO = oracle_tokens([r[3] for r in tr], TI.norm(dim=-1).mean()), oracle_tokens([r[3] for r in vrows], TI.norm(dim=-1).mean())
    print("cached towers", f"{time.time()-t0:.0f}s", flush=True)
N = len(tr)
for step in range(1, args.steps + 1):
    idx = torch.randint(N, (args.bs,), generator=g)
    px, ids, am = TRP[idx], TRT["input_ids"][idx], TRT["attention_mask"][idx]
    w_ids, w_rows = word_negatives(ids, am, table, args.wn, g)
    rnd = torch.roll(torch.arange(args.bs), 1)
    neg_ids = torch.where(w_rows[:, None], w_ids, ids[rnd]); neg_am = torch.where(w_rows[:, None], am, am[rnd])
    P = torch.cat([px, px, px[rnd]]); I = torch.cat([ids, neg_ids, ids]); A = torch.cat([am, neg_am, am])
    y = torch.cat([torch.ones(args.bs), torch.zeros(2 * args.bs)])
    if args.train == "fusion":
        with torch.no_grad():
            nxt = bb.text_inputs(neg_ids, neg_am)
        xi = (TO if args.oracle else TI)[idx]; XI = torch.cat([xi, xi, xi[rnd]]); xt = TT[idx]; XT = torch.cat([xt, nxt, xt])
        s = itm_score(None, None, A, grad=True, xi=XI, xt=XT)
    elif args.train == "text":
        xi = (TO if args.oracle else TI)[idx]; XI = torch.cat([xi, xi, xi[rnd]])
        s = itm_score(None, I, A, grad=True, xi=XI)
    else:
        s = itm_score(P, I, A, grad=True)
    loss = F.binary_cross_entropy_with_logits(s, y)
    if args.rtd > 0:
        b = args.bs
        lab = torch.cat([torch.zeros_like(ids), (neg_ids != ids).long()]).float()
        valid = torch.cat([am, am * w_rows[:, None].long()]).bool()
        r_l = F.binary_cross_entropy_with_logits(TOK["rtd"][:2 * b][valid], lab[valid])
        loss = loss + args.rtd * r_l
    lr = args.lr * min(1.0, step / 30)
    for gr in opt.param_groups: gr["lr"] = lr
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % 50 == 0:
        acc = float(((s > 0).float() == y).float().mean())
        print(step, f"{time.time()-t0:.0f}s rtd {r_l.item() if args.rtd > 0 else 0:.3f} loss {loss.item():.3f} acc {acc:.3f} wn_share {w_rows.float().mean():.2f}", flush=True)
    if step % args.eval_every == 0:
        print("EVAL", step, json.dumps(evaluate()), flush=True)
