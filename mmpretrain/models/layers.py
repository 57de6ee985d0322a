"""Building blocks shared by the model variants.

Every parameter is read inside the ``forward`` of the module that owns it (ZeRO-3 gathers a
module's parameters in its pre-forward hook only), so no top-level parameter is touched from a
plain method.

``Block`` is structurally a timm ViT block (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``/GELU/``mlp.fc2``, LayerNorm eps 1e-6, ``F.scaled_dot_product_attention``): its
unimodal image path reproduces ``timm.models.vision_transformer.Block`` exactly, and timm
state-dict keys load into it unchanged. With ``experts`` it carries VLMo-style per-modality
feed-forward experts over the shared attention: ``mlp``/``norm2`` (image expert, the timm
names), ``mlp_text``/``norm2_text`` and ``mlp_vl``/``norm2_vl``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.models.stems import PatchEmbed, hybrid_stem

# routes of Block.forward
IMAGE, TEXT, SPLIT, VL = "image", "text", "split", "vl"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block; ``route`` picks the feed-forward expert(s)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 experts: bool = False, gated: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        # gated: per-channel gates on both residual branches, initialised to 0 (LayerScale at 0,
        # as ReZero / Flamingo's gated cross-attention): the block starts as the identity
        if gated and experts:
            raise ValueError("a gated block has no modality experts")
        self.gate_attn = nn.Parameter(torch.zeros(dim)) if gated else None
        self.gate_mlp = nn.Parameter(torch.zeros(dim)) if gated else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, dropout)
        self.experts = experts
        if experts:
            self.norm2_text = nn.LayerNorm(dim, eps=1e-6)
            self.mlp_text = Mlp(dim, hidden, dropout)
            self.norm2_vl = nn.LayerNorm(dim, eps=1e-6)
            self.mlp_vl = Mlp(dim, hidden, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, route: str = IMAGE,
                n_image: int = 0) -> torch.Tensor:
        if self.gate_attn is not None:
            x = x + self.gate_attn.to(x.dtype) * self.attn(self.norm1(x), attn_mask)
            return x + self.gate_mlp.to(x.dtype) * self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), attn_mask)
        if not self.experts:
            return x + self.mlp(self.norm2(x))
        if route == IMAGE:
            return x + self.mlp(self.norm2(x))
        if route == TEXT:
            return x + self.mlp_text(self.norm2_text(x))
        if route == VL:
            return x + self.mlp_vl(self.norm2_vl(x))
        # SPLIT: image tokens first (n_image of them), then text tokens
        xi, xt = x[:, :n_image], x[:, n_image:]
        return torch.cat([xi + self.mlp(self.norm2(xi)), xt + self.mlp_text(self.norm2_text(xt))], dim=1)


IMAGE_STEMS = ("patch", "resnet")


def resnet_stem_embed(image_size: int, patch_size: int, width: int) -> nn.Module:
    """timm's R+ViT hybrid patch embedding (``vit_tiny_r_s16_p8_224``'s layout): the ResNetV2
    stem (7x7 stride-2 weight-standardised conv to 64 channels, GroupNorm(32) + ReLU, 3x3
    stride-2 max-pool: stride 4) and a ``patch_size / 4`` strided conv to ``width``, so the token
    grid is the same as a ``patch_size`` PatchEmbed's. GroupNorm and weight standardisation use no
    batch statistics: ranks stay exact. timm names (``backbone.conv``, ``backbone.norm``,
    ``proj``), so ``timm.create_model('vit_tiny_r_s16_p8_224', patch_size=patch_size // 4, ...)``
    holds the same weights."""
    if patch_size % 4 or patch_size < 4 or image_size % patch_size:
        raise ValueError(f"model.image_stem='resnet' needs patch_size a multiple of 4 that divides image_size, "
                         f"got patch_size={patch_size}, image_size={image_size}")
    return hybrid_stem(image_size, patch_size // 4, width)


class ImageEmbed(nn.Module):
    """timm PatchEmbed + class token + position embedding + image modality-type embedding.

    ``patch_embed``, ``cls_token`` and ``pos_embed`` carry the timm ViT names. The modality-type
    embedding starts at zero, so a freshly loaded timm ViT is reproduced exactly. ``stem``:
    'patch' (a linear ``patch_size`` patch projection, ViT) or 'resnet' (``resnet_stem_embed``,
    timm's R+ViT hybrid: convolutions see inside and across patch borders).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, dropout: float = 0.0, stem: str = "patch"):
        super().__init__()
        if stem not in IMAGE_STEMS:
            raise ValueError(f"model.image_stem: {stem!r} is not one of {', '.join(IMAGE_STEMS)}")
        if stem == "resnet":
            self.patch_embed = resnet_stem_embed(image_size, patch_size, width)
        else:
            self.patch_embed = PatchEmbed(img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=width)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.type_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def num_tokens(self) -> int:
        return self.patch_embed.num_patches + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.drop(x + self.type_embed)


class TextEmbed(nn.Module):
    """BERT embeddings (word + token type 0 + position, LayerNorm eps 1e-12) with the
    transformers names, plus a text modality-type embedding (zero-initialised)."""

    def __init__(self, vocab_size: int, width: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.type_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.drop = nn.Dropout(dropout)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.word_embeddings.weight[0].zero_()

    def bert_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Exactly ``transformers.BertEmbeddings(input_ids)`` (eval mode)."""
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        x = x + self.position_embeddings(pos)
        return self.LayerNorm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bert_embeddings(input_ids) + self.type_embed)


class LogitScale(nn.Module):
    """Learnable log logit scale, shape [1] (DeepSpeed rejects 0-dim parameters).
    ``forward()`` returns ``exp(log_scale)`` clamped at ``max_scale`` (fp32, shape [1])."""

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full([1], math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        s = self.log_scale
        s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
        return s.exp().clamp(max=self.max_scale)


class Projection(nn.Module):
    """Linear projection followed by L2 normalisation (in fp32)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return F.normalize(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y, dim=-1)


class ItmHead(nn.Module):
    """Pooler (Linear + tanh, as BERT/ViLT) then a 2-way classifier."""

    def __init__(self, dim: int):
        super().__init__()
        self.pooler = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.pooler(cls)))


class MatchHead(nn.Module):
    """ITM from two L2-normalised embeddings of one fused pair: match logit
    ``sum_k weight_k u_k v_k + bias`` (the no-match logit 0), ``weight`` initialised to ``scale``
    everywhere, so the head starts as ``scale`` x cosine. Returns [B, 2] like ``ItmHead``."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(scale)))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = (u * v * self.weight.to(u.dtype)).sum(-1) + self.bias.to(u.dtype)
        return torch.stack([torch.zeros_like(s), s], dim=-1)


class LateMatchHead(MatchHead):
    """ITM from the L2-normalised tokens of one fused pair, token by token (late interaction, as
    FILIP and ColBERT score): each real text token's best image token by a learned per-dimension
    weighting of their product, averaged over the text tokens, plus a bias (the no-match logit 0).
    A pooled embedding mixes every object's colour, shape and place into one vector, so it
    cannot say which colour sits on which shape; a local image token holds one object's colour
    and shape together and a text token read in context ("circle" after "red") can hold both,
    so their product can. ``weight`` starts at ``scale`` everywhere. Returns [B, 2] like ``ItmHead``.
    ``u``: [B, N, D] image tokens, ``v``: [B, L, D] text tokens, ``mask``: [B, L] 1 = real.
    The parameters are ``MatchHead``'s (``weight``, ``bias``)."""

    def forward(self, u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sim = torch.einsum("bld,bnd->bln", v * self.weight.to(v.dtype), u.to(v.dtype))
        best = sim.amax(dim=-1)  # [B, L]
        w = mask.to(best.dtype)
        s = (best * w).sum(-1) / w.sum(-1).clamp(min=1.0) + self.bias.to(best.dtype)
        return torch.stack([torch.zeros_like(s), s], dim=-1)


class MlmHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then a decoder to the vocabulary (its own
    weights, not tied to the word embeddings: ZeRO-3 reads a parameter only inside its owner)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(x))))


def key_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] 1/0 mask -> additive [B, 1, 1, N] mask for scaled_dot_product_attention."""
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    add = add.masked_fill(mask == 0, torch.finfo(dtype).min)
    return add[:, None, None, :]


def init_weights(module: nn.Module) -> None:
    """ViT-style init for Linear / LayerNorm (embeddings keep their own)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
