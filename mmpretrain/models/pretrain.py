"""``PretrainModel`` and ``build_model(model_cfg, loss_cfg, vocab_size) -> PretrainModel``
(re-exported by ``mmpretrain.models``).

``PretrainModel`` wraps a backbone (``unified.UnifiedTransformer`` — the default — or
``dual_encoder.DualEncoder``), the learnable logit scale and the losses, following the Model
contract of docs/ARCHITECTURE.md. Every collective and every parameter read happens inside
``forward`` or inside a submodule's ``forward`` (ZeRO-3), and every rank runs the same modules
with the same shapes each step.

``forward(pixels, input_ids, attention_mask, image_ids, feature_cache=None, mode="loss")``:
- ``mode="features"`` -> ``{"image_emb", "text_emb"}`` (L2-normalised, [B, E]).
- ``mode="loss"`` -> ``{"loss", "loss_itc", "loss_itm", "itm_acc", "loss_mlm", "mlm_acc",
  "logit_scale"}``; ``loss`` is the weighted total (fp32, with gradient), the others detached
  scalars. ``loss_itc`` is the contrastive part (InfoNCE, or the triplet hinge with
  ``loss.contrastive: triplet``). ``loss_itm``/``itm_acc`` are present when
  ``loss.itm_weight > 0``, ``loss_mlm``/``mlm_acc`` when ``loss.mlm_weight > 0``. The ITM pairs
  and the MLM pairs (image + masked caption) run through one fused pass.
- ``feature_cache`` (``mmpretrain.losses.FeatureCache``): InfoNCE over the whole accumulated
  batch. Trainer recipe for M micro-batches:
  ``with torch.no_grad(): feats = [model(*mb, mode="features") for mb in micro_batches]``;
  ``cache = FeatureCache.from_local([f["image_emb"] for f in feats], [f["text_emb"] ...])``;
  then for each m: ``out = model(*mb_m, feature_cache=cache.at(m, b))`` and backward
  ``out["loss"] / M`` (Accelerate's ``accumulate`` divides by M). The sum over micro-batches is
  the gradient of the full accumulated batch (see ``mmpretrain.losses``); this costs one extra
  no-grad forward per micro-batch. ITM negatives are mined within the current micro-batch
  (across ranks).
"""

from __future__ import annotations

import dataclasses
import typing

import torch
import torch.nn as nn

from mmpretrain import distributed as D
from mmpretrain import losses as L
from mmpretrain.models.config import LossConfig, ModelConfig
from mmpretrain.models.layers import LogitScale
from mmpretrain.word_negatives import word_negatives

__all__ = ["PretrainModel", "build_model", "build_model_from_dict", "ModelConfig", "LossConfig"]


class _Mined(typing.NamedTuple):
    """What ``mine_itm_negatives`` gives the fused pass: the kept positives' inputs, their
    negatives (raw ids/mask and pixels), the labels of the 3 row blocks and the kept rows."""

    share: float
    keep: torch.Tensor
    labels: torch.Tensor
    xi: torch.Tensor
    xt: torch.Tensor
    mask: torch.Tensor
    neg_ids: torch.Tensor
    neg_mask: torch.Tensor
    neg_pixels: torch.Tensor


class PretrainModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, vocab_size: int):
        super().__init__()
        self.model_cfg, self.loss_cfg, self.vocab_size = model_cfg, loss_cfg, int(vocab_size)
        if model_cfg.arch == "unified":
            from mmpretrain.models.unified import UnifiedTransformer

            self.backbone = UnifiedTransformer(model_cfg, vocab_size, mlm=loss_cfg.mlm_weight > 0)
        elif model_cfg.arch == "dual_encoder":
            from mmpretrain.models.dual_encoder import DualEncoder

            self.backbone = DualEncoder(model_cfg, vocab_size)
        else:
            raise ValueError(f"model.arch: {model_cfg.arch!r} is not 'unified' or 'dual_encoder'")
        if loss_cfg.contrastive not in ("infonce", "triplet"):
            raise ValueError(f"loss.contrastive: {loss_cfg.contrastive!r} is not 'infonce' or 'triplet'")
        if loss_cfg.itc_token_weight > 0 and model_cfg.arch != "unified":
            raise ValueError("loss.itc_token_weight > 0 needs model.arch=unified (it scores the towers' tokens)")
        if loss_cfg.mlm_weight > 0 and model_cfg.arch != "unified":
            raise ValueError("loss.mlm_weight > 0 needs model.arch=unified (MLM reads the fused text tokens)")
        if not 0 < loss_cfg.itm_fraction <= 1:
            raise ValueError(f"loss.itm_fraction must be in (0, 1], got {loss_cfg.itm_fraction}")
        if not 0 < loss_cfg.mlm_prob < 1:
            raise ValueError(f"loss.mlm_prob must be in (0, 1), got {loss_cfg.mlm_prob}")
        if not 0 <= loss_cfg.itm_random_mix <= 1 or loss_cfg.itm_curriculum_steps < 0:
            raise ValueError("loss.itm_random_mix must be in [0, 1] and loss.itm_curriculum_steps >= 0")
        if loss_cfg.itm_rank_weight < 0 or (loss_cfg.itm_rank_weight > 0 and loss_cfg.itm_weight <= 0):
            raise ValueError("loss.itm_rank_weight must be >= 0 and needs loss.itm_weight > 0 (it ranks the ITM passes)")
        if not 0 <= loss_cfg.itc_word_negatives <= 1:
            raise ValueError(f"loss.itc_word_negatives must be in [0, 1], got {loss_cfg.itc_word_negatives}")
        if loss_cfg.itc_word_negatives > 0 and loss_cfg.contrastive != "infonce":
            raise ValueError("loss.itc_word_negatives needs loss.contrastive=infonce")
        if not 0 <= loss_cfg.mlm_word_prob < 1:
            raise ValueError(f"loss.mlm_word_prob must be in [0, 1), got {loss_cfg.mlm_word_prob}")
        if not 0 <= loss_cfg.itm_word_negatives <= 1:
            raise ValueError(f"loss.itm_word_negatives must be in [0, 1], got {loss_cfg.itm_word_negatives}")
        if loss_cfg.itm_exchange not in ("all_to_all", "all_gather"):
            raise ValueError(f"loss.itm_exchange: {loss_cfg.itm_exchange!r} is not 'all_to_all' or 'all_gather'")
        if model_cfg.itm_head != "pooler" and model_cfg.arch != "unified":
            raise ValueError(f"model.itm_head={model_cfg.itm_head!r} needs model.arch=unified (the dual encoder's "
                             "fusion head is its own)")
        if model_cfg.itm_contrastive_prior and not (model_cfg.arch == "unified" and model_cfg.fusion_source == "towers"):
            raise ValueError("model.itm_contrastive_prior needs model.arch=unified and model.fusion_source=towers "
                             "(the prior reads the embeddings of the fused pair's unimodal tokens)")
        self.logit_scale = LogitScale(model_cfg.logit_scale_init, model_cfg.logit_scale_max)
        # running statistics of the ITM contrastive prior (model.itm_contrastive_prior): mean
        # contrastive logit of the ITM positives, of the negatives, and their pooled variance; set
        # by the first training forward, the same on every rank (global sums), saved with the model
        self.register_buffer("itm_prior_stats", torch.tensor([0.0, 0.0, 1.0]))
        # forward counter of the ITM sampler (same on every rank; saved for exact resume)
        self.register_buffer("itm_step", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ entry points
    def encode_image(self, pixels: torch.Tensor):
        return self.backbone.encode_image(pixels)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.backbone.encode_text(input_ids, attention_mask)

    def image_inputs(self, pixels):
        return self.backbone.image_inputs(pixels)

    def text_inputs(self, input_ids, attention_mask):
        return self.backbone.text_inputs(input_ids, attention_mask)

    def fuse(self, image_tokens, text_tokens, text_mask):
        """Fused [CLS] of ``image_inputs`` / ``text_inputs`` tokens (see the backbone)."""
        return self.backbone.fuse(image_tokens, text_tokens, text_mask)

    def itm_logits(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        """[B, 2] ITM logits of the pairs (pixels[i], text[i]); index 1 = match."""
        bb = self.backbone
        return self.itm_from_inputs(bb.image_inputs(pixels), bb.text_inputs(input_ids, attention_mask), attention_mask)

    def itm_from_inputs(self, image_inputs, text_inputs, text_mask) -> torch.Tensor:
        """[B, 2] fp32 ITM logits of ``image_inputs`` / ``text_inputs`` rows (with the prior)."""
        bb = self.backbone
        if hasattr(bb, "itm_logits_from_tokens"):  # unified: every fused token (the match head reads them all)
            tokens = bb.fuse_tokens(image_inputs, text_inputs, text_mask, normed=not bb.match_reads_stream)
            logits = bb.itm_logits_from_tokens(tokens, image_inputs.shape[1], text_mask).float()
        else:
            logits = bb.itm_logits_from_fused(bb.fuse(image_inputs, text_inputs, text_mask)).float()
        if self.model_cfg.itm_contrastive_prior:
            prior = self.contrastive_logit(bb.image_features(image_inputs)[1], bb.text_features(text_inputs, text_mask)[1])
            logits = self._add_prior(logits, prior)
        return logits

    def contrastive_logit(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """[P] ``logit_scale * cos`` of row-paired embeddings, detached, fp32."""
        dt = torch.float64 if image_emb.dtype == torch.float64 else torch.float32  # >= fp32
        s = self.logit_scale().detach().to(dt)
        return s * (image_emb.detach().to(dt) * text_emb.detach().to(dt)).sum(-1)

    def _add_prior(self, logits: torch.Tensor, contrastive: torch.Tensor) -> torch.Tensor:
        """Match logit += the two-Gaussian (LDA) log-odds of the contrastive logit: slope
        ``(mu_pos - mu_neg) / var`` through the midpoint (the head's bias holds the class prior)."""
        dt = torch.promote_types(logits.dtype, contrastive.dtype)
        mu_p, mu_n, var = self.itm_prior_stats.to(logits.device, dt).unbind(0)
        contrastive = contrastive.to(logits.device, dt)
        prior = (mu_p - mu_n) / var.clamp(min=1e-6) * (contrastive - 0.5 * (mu_p + mu_n))
        return logits.to(dt) + torch.stack([torch.zeros_like(prior), prior], dim=-1)

    @torch.no_grad()
    def _update_prior_stats(self, contrastive: torch.Tensor, labels: torch.Tensor, gather: bool, first: bool,
                             momentum: float = 0.9) -> None:
        """Prior statistics <- EMA of the global batch's mean positive and mean negative
        contrastive logit and their pooled variance (sums and counts averaged over ranks: exact
        for any split of the rows)."""
        pos = (labels == 1).to(contrastive.dtype)
        neg = 1 - pos
        x = contrastive
        sums = torch.stack([(x * pos).sum(), pos.sum(), (x * neg).sum(), neg.sum(), (x * x * pos).sum(),
                            (x * x * neg).sum()])
        if gather:
            sums = D.global_mean(sums)
        s_p, n_p, s_n, n_n, q_p, q_n = sums.unbind(0)
        if float(n_p) == 0 or float(n_n) == 0:
            return
        mu_p, mu_n = s_p / n_p, s_n / n_n
        var = (q_p - n_p * mu_p ** 2 + q_n - n_n * mu_n ** 2) / (n_p + n_n)
        batch = torch.stack([mu_p, mu_n, var.clamp(min=1e-6)])
        old = self.itm_prior_stats.to(batch.device, batch.dtype)
        new = batch if first else momentum * old + (1 - momentum) * batch
        self.itm_prior_stats.copy_(new.to(self.itm_prior_stats.device, self.itm_prior_stats.dtype))

    def config_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model_cfg), "loss": dataclasses.asdict(self.loss_cfg),
                "vocab_size": self.vocab_size}

    # ------------------------------------------------------------------ helpers
    def _next_step(self) -> int:
        """The forward counter of the seeded samplers (advanced by training forwards only)."""
        step = int(self.itm_step.item()) if self.training else 0
        if self.training:
            self.itm_step += 1
        return step

    def _word_table(self) -> list:
        if not self.loss_cfg.word_negative_table:
            raise ValueError("loss.itm_word_negatives, loss.itc_word_negatives or loss.mlm_word_prob is set but "
                             "loss.word_negative_table is empty (the trainer fills it from the tokenizer: "
                             "mmpretrain.word_negatives.build_table)")
        return self.loss_cfg.word_negative_table

    def _generator(self, step: int, stream: int) -> torch.Generator:
        """Stream 0: ITM negatives (the seed of earlier versions); 1: MLM masking; 2: ITM word
        negatives; 3: contrastive word negatives."""
        # torch's CPU generator keeps the low 32 bits of a seed: the streams are spread within them
        # (stream 0 keeps the seed of earlier versions; a collision needs ~2.6e9 steps)
        return torch.Generator().manual_seed((int(self.loss_cfg.itm_seed) * 1_000_003 + step
                                              + stream * 0x9E3779B1) % (1 << 32))

    def gather_embeddings(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, image_ids: torch.Tensor, gather: bool):
        """((image [W*B, E], text [W*B, E] with gradient, this rank's row offset), image ids
        [W*B]): every rank's embeddings (identities in one process or with ``gather`` off). Its own
        method so that a benchmark can time it (``models/bench.py``)."""
        if gather:
            b = img_emb.shape[0]
            gathered = (D.all_gather_with_grad(img_emb), D.all_gather_with_grad(txt_emb), D.get_rank() * b)
            return gathered, D.all_gather_no_grad(image_ids)
        return (img_emb, txt_emb, 0), image_ids

    def mine_itm_negatives(self, xi, xt, pixels, input_ids, attention_mask, img_emb, txt_emb, image_ids, ids_global,
                           gathered, scale, step: int, gather: bool, row0: int, n_rows: int, parts: dict) -> "_Mined":
        """ITM hard negatives: similarities, sampling, fetching the chosen rows from their ranks,
        word negatives, the hardest ``itm_fraction`` kept (``parts`` gets the word-negative share).
        Its own method so that a benchmark can time it (``models/bench.py``)."""
        lc = self.loss_cfg
        b = img_emb.shape[0]
        img_all, txt_all, off = gathered
        with torch.no_grad():
            dt = torch.float64 if img_emb.dtype == torch.float64 else torch.float32  # >= fp32
            s = scale.detach().to(dt)
            sim_i2t = s * img_emb.detach().to(dt) @ txt_all.detach().to(dt).t()
            sim_t2i = s * txt_emb.detach().to(dt) @ img_all.detach().to(dt).t()
        share = L.itm_uniform_share(step, lc.itm_curriculum_steps, lc.itm_random_mix)
        neg = L.sample_itm_negatives(sim_i2t, sim_t2i, image_ids, ids_global, self._generator(step, 0),
                                     lc.itm_floor, row_offset=off, uniform_mix=share)
        text_rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
        if gather:
            text_rows = D.fetch_rows(text_rows, neg.text_idx, lc.itm_exchange)
            neg_pixels = D.fetch_rows(pixels, neg.image_idx, lc.itm_exchange)
        else:
            text_rows, neg_pixels = text_rows[neg.text_idx], pixels[neg.image_idx]
        n_txt = input_ids.shape[1]
        neg_ids, neg_mask = text_rows[:, :n_txt], text_rows[:, n_txt:].to(attention_mask.dtype)
        if lc.itm_word_negatives > 0:  # own caption with one word changed (mmpretrain.word_negatives)
            w_ids, w_rows = word_negatives(input_ids, attention_mask, self._word_table(),
                                           lc.itm_word_negatives, self._generator(step, 2),
                                           row0, n_rows)
            sel = w_rows.to(neg_ids.device)[:, None]
            neg_ids = torch.where(sel, w_ids.to(neg_ids.device), neg_ids)
            neg_mask = torch.where(sel, attention_mask.to(neg_mask.device), neg_mask)
            share_w = w_rows.float().mean()
            parts["itm_word_share"] = D.global_mean(share_w) if gather else share_w
        rows = torch.arange(b, device=sim_i2t.device)
        hardness = sim_i2t[rows, neg.text_idx.to(sim_i2t.device)] + sim_t2i[rows, neg.image_idx.to(sim_i2t.device)]
        keep = L.select_hardest(hardness, lc.itm_fraction, gather).to(xi.device)
        labels = L.itm_labels(neg)
        if not bool(keep.all()):
            xi_k, xt_k, am_k = xi[keep], xt[keep], attention_mask[keep]
            neg_ids, neg_mask, neg_pixels = neg_ids[keep], neg_mask[keep], neg_pixels[keep]
            labels = labels.view(3, b)[:, keep.to(labels.device)].reshape(-1)
        else:
            xi_k, xt_k, am_k = xi, xt, attention_mask
        return _Mined(share, keep, labels, xi_k, xt_k, am_k, neg_ids, neg_mask, neg_pixels)

    # ------------------------------------------------------------------ forward
    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None, feature_cache: L.FeatureCache | None = None,
                mode: str = "loss") -> dict:
        bb, lc = self.backbone, self.loss_cfg
        xi = bb.image_inputs(pixels)
        xt = bb.text_inputs(input_ids, attention_mask)
        img_tok, img_emb = bb.image_features(xi)
        txt_tok, txt_emb = bb.text_features(xt, attention_mask)
        if mode == "features":
            return {"image_emb": img_emb, "text_emb": txt_emb}
        if mode != "loss":
            raise ValueError(f"forward: mode {mode!r} is not 'loss' or 'features'")
        b = img_emb.shape[0]
        gather = bool(lc.gather) and D.is_distributed()
        if image_ids is None:  # every sample its own image
            image_ids = torch.arange(b, device=img_emb.device) + D.get_rank() * b
        image_ids = image_ids.to(img_emb.device)
        scale = self.logit_scale()

        gathered, ids_global = self.gather_embeddings(img_emb, txt_emb, image_ids, gather)

        parts: dict[str, torch.Tensor] = {}
        use_itm, use_mlm, use_wc = lc.itm_weight > 0, lc.mlm_weight > 0, lc.itc_word_negatives > 0
        # the seeded per-row draws (word negatives, MLM masks) are made for every global row
        row0, n_rows = (D.get_rank() * b, b * D.get_world_size()) if gather else (0, b)
        step = self._next_step() if (use_itm or use_mlm or use_wc) else 0
        if lc.contrastive == "infonce":
            extra = None
            if use_wc:  # NegCLIP-style: each image also contrasts with its own caption, one word changed
                w_ids, w_rows = word_negatives(input_ids, attention_mask, self._word_table(),
                                               lc.itc_word_negatives, self._generator(step, 3),
                                               row0, n_rows)
                w_emb = bb.text_features(bb.text_inputs(w_ids, attention_mask), attention_mask)[1]
                extra = (img_emb * w_emb).sum(-1).masked_fill(~w_rows.to(img_emb.device), float("-inf"))
                share_c = w_rows.float().mean()
                parts["itc_word_share"] = D.global_mean(share_c) if gather else share_c
            parts["loss_itc"] = L.info_nce(img_emb, txt_emb, scale, gather=gather, cache=feature_cache,
                                           gathered=gathered, extra_i2t=extra)
        else:
            parts["loss_itc"] = L.triplet_loss(img_emb, txt_emb, lc.triplet_margin, gather=gather,
                                               hardest=lc.triplet_hardest, image_ids=image_ids, gathered=gathered)
        parts["logit_scale"] = scale.detach().reshape(())
        if lc.itc_token_weight > 0:  # FILIP: each caption token against single image tokens
            if feature_cache is not None:
                raise ValueError("loss.itc_token_weight does not combine with the feature cache (train.grad_accum_steps "
                                 "> 1 with train.feature_cache=true); set one of them off")
            parts["loss_itc_token"] = L.token_info_nce(bb.image_proj(img_tok), bb.text_proj(txt_tok), attention_mask,
                                                       scale, gather=gather)

        if not (use_itm or use_mlm):
            return L.combined(parts, lc)
        n_img = xi.shape[1]
        chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # fused-pass inputs
        if use_itm:
            mined = self.mine_itm_negatives(xi, xt, pixels, input_ids, attention_mask, img_emb, txt_emb, image_ids,
                                            ids_global, gathered, scale, step, gather, row0, n_rows, parts)
            share, keep, labels = mined.share, mined.keep, mined.labels
            xi_k, xt_k, am_k = mined.xi, mined.xt, mined.mask
            neg_ids, neg_mask, neg_pixels = mined.neg_ids, mined.neg_mask, mined.neg_pixels
            neg_xt = bb.text_inputs(neg_ids, neg_mask)
            neg_xi = bb.image_inputs(neg_pixels)
            chunks += [(xi_k, xt_k, am_k), (xi_k, neg_xt, neg_mask), (neg_xi, xt_k, am_k)]
        if use_mlm:
            if lc.mlm_mask_token_id < 0:
                raise ValueError("loss.mlm_mask_token_id is not set (the trainer fills it from the tokenizer)")
            focus = [row[3] for row in self._word_table() if row[0] != 3] if lc.mlm_word_prob > 0 else []
            mlm_ids, mlm_labels = L.mlm_mask(input_ids, attention_mask, self._generator(step, 1), lc.mlm_prob,
                                             lc.mlm_mask_token_id, self.vocab_size,
                                             row0, n_rows, focus, lc.mlm_word_prob)
            chunks.append((xi, bb.text_inputs(mlm_ids, attention_mask), attention_mask))
        sizes = [c[0].shape[0] for c in chunks]
        fused_in = [torch.cat([c[j] for c in chunks]) for j in range(3)]
        if not hasattr(bb, "fuse_tokens"):  # dual encoder: its fusion head returns the read-out
            readout = bb.fuse(*fused_in)
        else:  # unified: one fused pass over the ITM and MLM pairs together
            stream = bb.match_reads_stream and use_itm
            pieces = list(torch.split(bb.fuse_tokens(*fused_in, normed=not stream), sizes))
            if use_mlm:
                text_tok = pieces.pop()[:, n_img:]
                if stream:  # MLM reads the final-norm tokens
                    text_tok = bb.fusion_norm(text_tok)
                chosen = mlm_labels != -100
                parts["loss_mlm"], parts["mlm_acc"] = L.mlm_loss(bb.mlm_logits(text_tok[chosen]),
                                                                 mlm_labels[chosen])
            if use_itm:
                n_itm = sum(sizes[:3])
                logits = bb.itm_logits_from_tokens(torch.cat(pieces), n_img, fused_in[2][:n_itm])
        if use_itm:
            if not hasattr(bb, "fuse_tokens"):
                logits = bb.itm_logits_from_fused(readout)
            if self.model_cfg.itm_contrastive_prior:  # towers: the pairs' embeddings only pool + project
                ie_k, te_k = (img_emb, txt_emb) if bool(keep.all()) else (img_emb[keep], txt_emb[keep])
                prior = torch.cat([self.contrastive_logit(ie_k, te_k),
                                   self.contrastive_logit(ie_k, bb.text_features(neg_xt, neg_mask)[1]),
                                   self.contrastive_logit(bb.image_features(neg_xi)[1], te_k)])
                if self.training:
                    self._update_prior_stats(prior, labels.to(prior.device), gather, first=step == 0)
                logits = self._add_prior(logits, prior)
                mu_p, mu_n, var = self.itm_prior_stats.detach().unbind(0)
                parts["itm_prior_slope"] = ((mu_p - mu_n) / var.clamp(min=1e-6)).reshape(())
            parts["loss_itm"], parts["itm_acc"] = L.itm_loss(logits, labels.to(logits.device))
            if lc.itm_rank_weight > 0:
                parts["loss_itm_rank"], parts["itm_rank_acc"] = L.itm_rank_loss(logits, labels.to(logits.device))
            parts["itm_uniform_share"] = torch.tensor(float(share), device=logits.device)
        return L.combined(parts, lc)


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig | None, vocab_size: int) -> PretrainModel:
    """The model of ``model_cfg``, randomly initialised, then its towers initialised from the local
    pretrained files the config names (``models.pretrained.apply_pretrained``; before any
    ``accelerator.prepare``, i.e. before ZeRO-3 partitions anything)."""
    from mmpretrain.models.pretrained import apply_pretrained

    model = PretrainModel(model_cfg, loss_cfg or LossConfig(), vocab_size)
    apply_pretrained(model, model_cfg)
    return model


def build_model_from_dict(d: dict) -> PretrainModel:
    """Rebuild from ``config_dict()`` (weights are then loaded by the caller; the pretrained
    file paths recorded in the dict are not read again)."""
    def make(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    mcfg = make(ModelConfig, d.get("model"))
    mcfg.image_pretrained, mcfg.text_pretrained = "", ""
    return build_model(mcfg, make(LossConfig, d.get("loss")), int(d["vocab_size"]))
