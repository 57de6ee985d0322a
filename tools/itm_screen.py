"""ITM screening and diagnostics: an in-memory training loop over the same model, losses,
optimizer and schedule as the trainer (no loader, no Accelerate), for quick A/B runs and the
ITM diagnostics of docs/BENCHMARKS.md ("Quality"): per-loss gradient norms on the shared
blocks, ITM accuracy on random vs mined negatives, the hardness gap, and the attention of the
fused read-out token to the other modality (``--diag N``).

    python tools/itm_screen.py --shards shards/synthetic --steps 300 --val-images 500 \
        --set loss.itm_weight=20 loss.mlm_weight=1.0 --diag 100

Its figures are screening numbers (one seed; the held-out subset of --val-images images); the
product's numbers come from ``mmpretrain bench quality``.
"""
import argparse, glob, io, json, math, random, time, sys
import numpy as np
import torch
import torch.nn.functional as F

from mmpretrain.models import build_model
from mmpretrain.models.config import ModelConfig, LossConfig
from mmpretrain.trainer.config import OptimConfig
from mmpretrain.trainer.optim import build_optimizer, lr_at
from mmpretrain.data import transforms as T
from mmpretrain.data.shardio import iter_shard_samples
from mmpretrain.data.tokenizer import load_tokenizer, tokenize
from mmpretrain.evaluation.retrieval import retrieval_metrics, topk_candidates, rerank_scores

p = argparse.ArgumentParser()
p.add_argument("--shards", default="shards/synthetic")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--scale", type=float, nargs=2, default=[0.9, 1.0])
p.add_argument("--set", nargs="*", default=[])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--log", type=int, default=25)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--diag", type=int, default=0)
p.add_argument("--val-images", type=int, default=1000)
p.add_argument("--k", type=int, default=16)
args = p.parse_args()
torch.set_num_threads(args.threads)


def read(pattern):
    out = []
    for f in sorted(glob.glob(pattern)):
        for _, v in iter_shard_samples(f):
            out.append((v["jpg"], v["txt"].decode(), json.loads(v["json"])["image_id"]))
    return out

tok = load_tokenizer("auto", [args.shards + "/train-*.tar"], 1000)
train = read(args.shards + "/train-*.tar")
val = read(args.shards + "/val-*.tar")[:2 * args.val_images]
print("train", len(train), "val", len(val), flush=True)

mc, lc, oc = ModelConfig(image_size=64, patch_size=16, width=128, depth=4, num_heads=4, embed_dim=128,
                         max_text_length=32), LossConfig(), OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=30)
for kv in args.set:
    k, v = kv.split("=", 1)
    sec, name = k.split(".")
    obj = {"model": mc, "loss": lc, "optim": oc}[sec]
    cur = getattr(obj, name)
    setattr(obj, name, type(cur)(v) if not isinstance(cur, bool) else v.lower() in ("1", "true"))
lc.mlm_mask_token_id = tok.mask_token_id
if lc.itm_word_negatives > 0 or lc.mlm_word_prob > 0 or lc.itc_word_negatives > 0:
    from mmpretrain.word_negatives import build_table, load_word_sets
    lc.word_negative_table = build_table(load_word_sets(lc.word_negative_words), tok)
torch.manual_seed(args.seed)
model = build_model(mc, lc, len(tok))
opt = build_optimizer(model, oc)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
rng = random.Random(args.seed)
order = list(range(len(train)))
rng.shuffle(order)

def batch(idx, train_mode):
    data = train if train_mode else val
    imgs = []
    for i in idx:
        img = T.open_image(data[i][0], 10**8)
        box = T.random_resized_box(*img.size, random.Random(hash((args.seed, i, pos))), scale=tuple(args.scale)) if train_mode else T.center_box(*img.size)
        img, box = T.load_image(img, 10**8, box, 64)
        imgs.append(np.asarray(img.resize((64, 64), 3, box=box, reducing_gap=None), dtype=np.uint8))
    px = T.normalize(T.stack_chw(imgs), MEAN, STD)
    t = tokenize(tok, [data[i][1] for i in idx], 32)
    ids = torch.tensor([hash(data[i][2]) & ((1 << 62) - 1) for i in idx])
    return px, t["input_ids"], t["attention_mask"], ids

import mmpretrain.models.layers as LX
def diagnose(px, ii, am, ids):
    d = {}
    shared = [p for n, p in model.named_parameters() if n.startswith("backbone.blocks")]
    saved = model.itm_step.clone()
    for part, (wc, wi, wm) in {"itc": (1, 0, 0), "itm": (0, 1, 0), "mlm": (0, 0, 1)}.items():
        if part == "itm" and lc.itm_weight == 0 or part == "mlm" and lc.mlm_weight == 0:
            continue
        old = (lc.contrastive_weight, lc.itm_weight, lc.mlm_weight)
        lc.contrastive_weight, lc.itm_weight, lc.mlm_weight = wc, wi if part == "itm" else 1e-12 * (old[1] > 0), wm if part == "mlm" else 1e-12 * (old[2] > 0)
        model.itm_step.copy_(saved)
        out = model(px, ii, am, ids)
        fusion = [p for n, p in model.named_parameters() if n.startswith("backbone.fusion_blocks")]
        g = torch.autograd.grad(out["loss"], shared + fusion, allow_unused=True)
        norm = lambda gs: float(torch.sqrt(sum((x.float() ** 2).sum() for x in gs if x is not None) + 0.0))
        d["gnorm_" + part] = norm(g[:len(shared)])
        if fusion:
            d["gnorm_fusion_" + part] = norm(g[len(shared):])
        lc.contrastive_weight, lc.itm_weight, lc.mlm_weight = old
    model.itm_step.copy_(saved)
    model.eval()
    with torch.no_grad():
        ie, te = model.encode_image(px)[1], model.encode_text(ii, am)[1]
        sim = ie @ te.t()
        same = ids[:, None] == ids[None, :]
        hard = sim.masked_fill(same, -9).argmax(1)
        rnd = (torch.arange(len(ids)) + 1 + torch.randint(len(ids) - 1, (1,))) % len(ids)
        def sc(ti):
            lg = model.itm_logits(px, ii[ti], am[ti]); return lg[:, 1] - lg[:, 0]
        sp, sh, sr = sc(torch.arange(len(ids))), sc(hard), sc(rnd)
        d["acc_pos"], d["acc_hard"], d["acc_rand"] = float((sp > 0).float().mean()), float((sh < 0).float().mean()), float((sr < 0).float().mean())
        d["pair_hard"], d["pair_rand"] = float((sp > sh).float().mean()), float((sp > sr).float().mean())
        d["hard_sim_gap"] = float((sim.diag() - sim[torch.arange(len(ids)), hard]).mean())
        # attention of the read-out token to the other modality, per layer
        bb = model.backbone
        n_img = bb.image_embed.num_tokens
        ridx = bb.readout_index(n_img)
        shares = []
        def hook(mod, inp, outp):
            x, mask = inp[0], inp[1] if len(inp) > 1 else None
            b, n, c = x.shape
            qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            a = (q @ k.transpose(-1, -2)) / mod.head_dim ** 0.5
            if mask is not None:
                a = a + mask
            a = a.softmax(-1)[:, :, ridx]  # [b, h, n]
            other = a[..., n_img:].sum(-1) if ridx < n_img else a[..., :n_img].sum(-1)
            shares.append(float(other.mean()))
        hs = [blk.attn.register_forward_hook(hook) for blk in (bb.fusion_blocks if getattr(bb, "towers", False) else bb.blocks)]
        fused = model.itm_logits(px, ii, am)
        for h in hs: h.remove()
        d["attn_other_modality"] = [round(x, 3) for x in shares]
    model.train()
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

t0 = time.time()
pos = 0
hist = []
model.train()
for step in range(1, args.steps + 1):
    if pos + args.bs > len(order):
        rng.shuffle(order); pos = 0
    idx = order[pos:pos + args.bs]; pos += args.bs
    px, ii, am, ids = batch(idx, True)
    lr = lr_at(step - 1, oc, args.steps)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    out = model(px, ii, am, ids)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
    opt.step()
    rec = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
    rec["gn"] = float(gn)
    if args.diag and (step % args.diag == 0 or step == 1):
        rec_d = diagnose(px, ii, am, ids)
        print("DIAG", step, json.dumps(rec_d), flush=True)
    hist.append(rec)
    if step % args.log == 0:
        avg = {k: sum(h[k] for h in hist[-args.log:]) / args.log for k in rec}
        print(step, f"{time.time()-t0:.0f}s", " ".join(f"{k}={v:.3f}" for k, v in avg.items()), flush=True)
train_time = time.time() - t0

# ---------------- eval
model.eval()
uniq = {}
for j, (_, _, iid) in enumerate(val):
    uniq.setdefault(iid, j)
img_rows = list(uniq.values())
img_index = {iid: n for n, iid in enumerate(uniq)}
cap_img = torch.tensor([img_index[v[2]] for v in val])
with torch.no_grad():
    IE, TE, PX = [], [], []
    for s in range(0, len(img_rows), 128):
        px, _, _, _ = batch(img_rows[s:s + 128], False)
        PX.append(px); IE.append(model.encode_image(px)[1])
    for s in range(0, len(val), 128):
        _, ii, am, _ = batch(list(range(s, min(s + 128, len(val)))), False)
        TE.append(model.encode_text(ii, am)[1])
    IE, TE, PX = torch.cat(IE), torch.cat(TE), torch.cat(PX)
    toks = tokenize(tok, [v[1] for v in val], 32)
    S = IE @ TE.t()
    m = retrieval_metrics(S, cap_img, [1, 5, 10])
    res = {"mean_recall": m.get("mean_recall", sum(m.values()) / len(m))}
    res.update(m)
    K = args.k
    te = time.time()
    ci2t = topk_candidates(S, K); ct2i = topk_candidates(S.t(), K)
    def itm(pi, ti):
        out = []
        for s in range(0, len(pi), 512):
            lg = model.itm_logits(PX[pi[s:s+512]], toks["input_ids"][ti[s:s+512]], toks["attention_mask"][ti[s:s+512]])
            out.append(lg[:, 1] - lg[:, 0])
        return torch.cat(out)
    n_i = S.shape[0]
    pi = torch.arange(n_i).repeat_interleave(K); ti = ci2t.reshape(-1)
    new_i2t = itm(pi, ti).view(n_i, K).double()
    ti2 = torch.arange(S.shape[1]).repeat_interleave(K); pi2 = ct2i.reshape(-1)
    new_t2i = itm(pi2, ti2).view(S.shape[1], K).double()
    mr = retrieval_metrics(rerank_scores(S, ci2t, new_i2t), cap_img, [1, 5, 10])
    from mmpretrain.evaluation.retrieval import retrieval_ranks, pessimistic_ranks, caption_positive_mask, metrics_from_ranks
    # t2i reranked: ranks of caption queries
    i2t_r, _ = retrieval_ranks(rerank_scores(S, ci2t, new_i2t), cap_img)
    pos_mask = caption_positive_mask(cap_img, n_i)  # [N, U]? check
    t2i_scores = rerank_scores(S.t(), ct2i, new_t2i)
    if pos_mask.shape != t2i_scores.shape:
        pos_mask = pos_mask.t()
    t2i_r = pessimistic_ranks(t2i_scores, pos_mask)
    mr = metrics_from_ranks(i2t_r, t2i_r, [1, 5, 10])
    res["itm_mean_recall"] = mr.get("mean_recall", None)
    # BLIP-style: ITM log-odds + the contrastive logit (logit_scale x cosine) of the candidates
    ls = float(model.logit_scale().detach())
    add_i2t = new_i2t + ls * S.double().gather(1, ci2t)
    add_t2i = new_t2i + ls * S.t().double().gather(1, ct2i)
    i2t_c, _ = retrieval_ranks(rerank_scores(S, ci2t, add_i2t), cap_img)
    t2i_c = pessimistic_ranks(rerank_scores(S.t(), ct2i, add_t2i), pos_mask)
    res["itm_plus_itc_mean_recall"] = metrics_from_ranks(i2t_c, t2i_c, [1, 5, 10]).get("mean_recall", None)
    # ITM acc on hard negatives: hardest wrong caption per image, hardest wrong image per caption
    wrong = ~caption_positive_mask(cap_img, n_i)
    if wrong.shape != S.shape:
        wrong = wrong.t()
    hard_t = S.masked_fill(~wrong, -9).argmax(1)
    hard_i = S.t().masked_fill(~wrong.t(), -9).argmax(1)
    pos_t = torch.tensor([int((cap_img == i).nonzero()[0]) for i in range(n_i)])
    s_pos = itm(torch.arange(n_i), pos_t)
    s_neg_t = itm(torch.arange(n_i), hard_t)
    s_neg_i = itm(hard_i, torch.arange(S.shape[1]))
    res["itm_acc_pos"] = float((s_pos > 0).float().mean())
    res["itm_acc_hardneg"] = float(torch.cat([s_neg_t < 0, s_neg_i < 0]).float().mean())
    res["itm_pair_acc"] = float((s_pos > s_neg_t).float().mean())
    res["eval_itm_s"] = time.time() - te
res["train_s"] = train_time
print("RESULT", json.dumps({"set": args.set, "scale": args.scale, "steps": args.steps, "seed": args.seed, **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}), flush=True)
