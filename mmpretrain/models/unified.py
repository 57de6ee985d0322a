"""Unified single-stream transformer (ViLT / seed 002; VLMo experts as an option).

One set of weights:
- ``image_inputs(pixels)``: timm PatchEmbed + [CLS] + position + image-type embedding.
- ``text_inputs(ids, mask)``: BERT embeddings + text-type embedding.
- one shared stack of pre-norm ``Block``s (timm ViT block layout) and a final ``norm``.
- ``encode_image(pixels) -> (tokens, emb)``: the stack over the image inputs; ``tokens`` are
  the final-norm outputs (equal to timm ``forward_features`` for a loaded ViT), ``emb`` the
  L2-normalised projection of the pooled tokens (``pool``: 'mean' over tokens — the default,
  it learns much faster from random init than a [CLS] readout — or 'cls').
- ``encode_text(ids, mask) -> (tokens, emb)``: the stack over the text inputs with a key
  padding mask; ``emb`` from the mean over non-padding tokens (or the text [CLS], position 0).
- ``fuse(image_tokens, text_tokens, text_mask) -> [B, width]``: *input-level* tokens (from
  ``image_inputs``/``text_inputs``) concatenated ``[image; text]`` and run through the same
  stack (padding keys masked); returns the final-norm output of the ITM read-out token
  (``itm_readout``: the text [CLS] — ViLT's layout, the default — or the image [CLS]), which
  feeds ``itm_head`` (dense + tanh pooler, 2-way classifier); with ``itm_head: match`` the
  fused image and text tokens are pooled and projected as the embeddings are and
  ``itm_match`` (a learned per-dimension weighting of their product) gives the logit; with
  ``itm_head: late`` every fused image and text token is projected and ``itm_match`` scores the
  pair token by token (each text token's best image token, FILIP/ColBERT-style). ``fuse_tokens`` returns every
  fused token; ``mlm_logits(fused_text_tokens)`` predicts the vocabulary for MLM.

With ``fusion_source: towers`` (ALBEF/BLIP-style) the fused pass starts from the unimodal
outputs instead: ``image_inputs``/``text_inputs`` then return the final-norm tokens of the
unimodal passes (the shared stack over each modality alone, as the contrastive embeddings see
them), ``image_features``/``text_features`` only pool and project them, and ``fuse_tokens`` runs
``fusion_depth`` dedicated blocks (``fusion_blocks`` + ``fusion_norm``) over ``[image; text]``.
The ITM and MLM gradients then train their own fusion weights at full strength and reach the
shared stack through the aligned tokens; the unimodal path (and every tower export) is
unchanged.

With ``modality_experts`` (VLMo): unimodal passes use the image (``mlp``) or text
(``mlp_text``) FFN in every block; the fused pass routes image tokens to the image FFN and text
tokens to the text FFN in the lower blocks, and uses the vision-language FFN (``mlp_vl``) in
the top ``vl_expert_layers`` blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.models import layers as Lx
from mmpretrain.models.config import ModelConfig


class UnifiedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, mlm: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.image_embed = Lx.ImageEmbed(cfg.image_size, cfg.patch_size, w, cfg.dropout, cfg.image_stem)
        self.text_embed = Lx.TextEmbed(vocab_size, w, cfg.max_text_length, cfg.dropout)
        self.blocks = nn.ModuleList(
            Lx.Block(w, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.modality_experts) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.image_proj = Lx.Projection(w, cfg.embed_dim)
        self.text_proj = Lx.Projection(w, cfg.embed_dim)
        if cfg.itm_head not in ("pooler", "match", "late"):
            raise ValueError(f"model.itm_head: {cfg.itm_head!r} is not 'pooler', 'match' or 'late'")
        # 'match' reads the fused pass through the contrastive projections (MatchHead, built last)
        self.itm_head = Lx.ItmHead(w) if cfg.itm_head == "pooler" else None
        if cfg.fusion_source not in ("inputs", "towers"):
            raise ValueError(f"model.fusion_source: {cfg.fusion_source!r} is not 'inputs' or 'towers'")
        self.towers = cfg.fusion_source == "towers"
        # the MLM head exists only when the loss uses it (no unused parameters under DDP)
        self.mlm_head = Lx.MlmHead(w, vocab_size) if mlm else None
        if cfg.itm_readout not in ("text_cls", "image_cls"):
            raise ValueError(f"model.itm_readout: {cfg.itm_readout!r} is not 'text_cls' or 'image_cls'")
        if self.mlm_head is not None:
            Lx.init_weights(self.mlm_head)
        Lx.init_weights(self.blocks)
        Lx.init_weights(self.norm)
        Lx.init_weights(self.image_proj)
        Lx.init_weights(self.text_proj)
        if self.itm_head is not None:
            Lx.init_weights(self.itm_head)
        if self.towers:  # built last: the other weights draw the same random numbers as without it
            if cfg.fusion_depth < 1:
                raise ValueError(f"model.fusion_depth must be >= 1 with fusion_source=towers, got {cfg.fusion_depth}")
            self.fusion_blocks = nn.ModuleList(
                Lx.Block(w, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, gated=cfg.fusion_gates)
                for _ in range(cfg.fusion_depth))
            self.fusion_norm = nn.LayerNorm(w, eps=1e-6)
            Lx.init_weights(self.fusion_blocks)
            Lx.init_weights(self.fusion_norm)
        # constant initialisation: no random draws, the weights above are those of 'pooler'
        head = {"match": Lx.MatchHead, "late": Lx.LateMatchHead}.get(cfg.itm_head)
        self.itm_match = None if head is None else head(cfg.embed_dim, cfg.logit_scale_init)
        if cfg.fusion_gates and not self.towers:
            raise ValueError("model.fusion_gates needs model.fusion_source=towers (it gates the fusion blocks)")
        # match + towers: the head reads the fused residual stream (the towers' tokens plus what the
        # fusion blocks add), not fusion_norm's output, so that identity blocks give the embeddings
        self.match_reads_stream = cfg.itm_head in ("match", "late") and self.towers
        self.grad_checkpointing = cfg.grad_checkpointing

    # ------------------------------------------------------------------ stack
    def _run(self, x: torch.Tensor, mask: torch.Tensor | None, routes: list[str], n_image: int = 0,
             fusion: bool = False, normed: bool = True):
        blocks, norm = (self.fusion_blocks, self.fusion_norm) if fusion else (self.blocks, self.norm)
        attn_mask = None if mask is None else Lx.key_padding_mask(mask, x.dtype)
        for blk, route in zip(blocks, routes):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, route, n_image, use_reentrant=False)
            else:
                x = blk(x, attn_mask, route, n_image)
        return norm(x) if normed else x

    def _pool(self, tokens: torch.Tensor, mask: torch.Tensor | None, mode: str | None = None) -> torch.Tensor:
        mode = mode or self.cfg.pool
        if mode == "cls":
            return tokens[:, 0]
        if mode == "max":
            if mask is None:
                return tokens.amax(dim=1)
            return tokens.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(tokens.dtype).min).amax(dim=1)
        if mask is None:
            return tokens.mean(dim=1)
        w = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)

    def _fused_routes(self) -> list[str]:
        d = self.cfg.depth
        if not self.cfg.modality_experts:
            return [Lx.SPLIT] * d
        top = min(max(self.cfg.vl_expert_layers, 0), d)
        return [Lx.SPLIT] * (d - top) + [Lx.VL] * top

    # ------------------------------------------------------------------ inputs
    def image_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image side of a fused pass: the input embeddings, or (towers) the unimodal tokens."""
        x = self.image_embed(pixels)
        return self._run(x, None, [Lx.IMAGE] * self.cfg.depth) if self.towers else x

    def text_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text side of a fused pass: the input embeddings, or (towers) the unimodal tokens."""
        x = self.text_embed(input_ids)
        return self._run(x, attention_mask, [Lx.TEXT] * self.cfg.depth) if self.towers else x

    # ------------------------------------------------------------------ unimodal
    def image_features(self, x: torch.Tensor):
        tokens = x if self.towers else self._run(x, None, [Lx.IMAGE] * self.cfg.depth)
        mode = self.cfg.pool if self.cfg.image_pool == "same" else self.cfg.image_pool
        return tokens, self.image_proj(self._pool(tokens, None, mode))

    def text_features(self, x: torch.Tensor, attention_mask: torch.Tensor):
        tokens = x if self.towers else self._run(x, attention_mask, [Lx.TEXT] * self.cfg.depth)
        return tokens, self.text_proj(self._pool(tokens, attention_mask))

    def encode_image(self, pixels: torch.Tensor):
        return self.image_features(self.image_inputs(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.text_features(self.text_inputs(input_ids, attention_mask), attention_mask)

    # ------------------------------------------------------------------ fused
    def fuse_tokens(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                    normed: bool = True) -> torch.Tensor:
        """Every final-norm token of the fused pass ``[image; text]``: [B, N_img + L, width]
        (``normed=False``, towers: the residual stream before ``fusion_norm``)."""
        b, n_img = image_tokens.shape[:2]
        text_tokens = text_tokens.to(image_tokens.dtype)
        x = torch.cat([image_tokens, text_tokens], dim=1)
        mask = torch.cat([torch.ones(b, n_img, dtype=text_mask.dtype, device=text_mask.device), text_mask], dim=1)
        if self.towers:
            return self._run(x, mask, [Lx.IMAGE] * self.cfg.fusion_depth, n_img, fusion=True, normed=normed)
        return self._run(x, mask, self._fused_routes(), n_img)

    def readout_index(self, n_image_tokens: int) -> int:
        return n_image_tokens if self.cfg.itm_readout == "text_cls" else 0

    def fuse(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.fuse_tokens(image_tokens, text_tokens, text_mask)
        return tokens[:, self.readout_index(image_tokens.shape[1])]

    def mlm_logits(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of fused text tokens ([..., width] -> [..., vocab])."""
        return self.mlm_head(text_tokens)

    def itm_logits_from_fused(self, fused: torch.Tensor) -> torch.Tensor:
        """[B, 2] ITM logits of the ``fuse`` read-out (``itm_head: pooler``)."""
        if self.itm_head is None:
            raise ValueError("model.itm_head='match' reads every fused token: use itm_logits_from_tokens")
        return self.itm_head(fused)

    def itm_logits_from_tokens(self, tokens: torch.Tensor, n_image: int, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] ITM logits of ``fuse_tokens`` output (``n_image`` image tokens first, then the
        text tokens with ``text_mask``): the read-out token through the pooler head, or (match)
        the fused image and text tokens pooled and projected as the embeddings are, then
        ``MatchHead``. With ``match_reads_stream`` the tokens are ``fuse_tokens(..., normed=False)``."""
        if self.itm_match is None:
            return self.itm_head(tokens[:, self.readout_index(n_image)])
        if self.cfg.itm_head == "late":  # every token projected; LateMatchHead pairs them
            return self.itm_match(self.image_proj(tokens[:, :n_image]), self.text_proj(tokens[:, n_image:]), text_mask)
        mode = self.cfg.pool if self.cfg.image_pool == "same" else self.cfg.image_pool
        u = self.image_proj(self._pool(tokens[:, :n_image], None, mode))
        v = self.text_proj(self._pool(tokens[:, n_image:], text_mask))
        return self.itm_match(u, v)  # Projection gives >= fp32
