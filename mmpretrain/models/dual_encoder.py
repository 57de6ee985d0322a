"""Dual encoder (seeds 000, 001, 003, 004) behind the unified model's interface.

- image tower: any timm backbone (``timm.create_model(name, pretrained=False, num_classes=0)``;
  its ``forward_features`` map or tokens, projected to ``width``), or ``small_cnn`` (4 strided
  convs, GroupNorm, GELU; the shipped configs' tower: it has no timm form, so it does not export
  to timm). timm's ``test_efficientnet_gn`` (a 0.1 M-parameter EfficientNet with GroupNorm) is
  the exportable alternative: like ``small_cnn`` it has no BatchNorm, so results do not depend on
  how the batch is split across ranks, and it exports to timm / TimmWrapper /
  sentence-transformers exactly (``mmpretrain.export.towers``), but it learned 29 points of mean
  recall less at 300 steps (docs/BENCHMARKS.md). A BatchNorm backbone (``resnet50``)
  trains with per-rank batch statistics.
- text tower: ``transformers.BertModel`` built from a ``BertConfig`` (width, depth, heads).
- ``encode_image`` / ``encode_text`` -> ``(tokens, emb)``; image emb from mean-pooled tokens,
  text emb from the mean over non-padding tokens (``pool: cls``: the [CLS] token); both L2-normalised projections to ``embed_dim``.
- ``fuse(image_tokens, text_tokens, text_mask)`` takes the *tower outputs* (``image_inputs``
  and ``text_inputs`` are the towers here) and returns a fused [CLS] for the ITM head:
  ``cross_attention`` (seed 003: text queries attend to image keys/values, ``fusion_depth``
  layers) or ``linear`` (seed 000: [img, txt, img*txt, |img-txt|] -> Linear -> GELU).
- contrastive loss: InfoNCE, or hinge/triplet with ``loss.contrastive: triplet`` (seed 004).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmpretrain.models import layers as Lx
from mmpretrain.models.config import ModelConfig


class SmallCNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        chans = [3, max(width // 8, 8), max(width // 4, 16), max(width // 2, 32), width]
        mods = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            mods += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(1, cout), nn.GELU()]
        self.net = nn.Sequential(*mods)
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_backbone == "small_cnn":
            self.backbone = SmallCNN(cfg.width)
        else:
            import timm

            kw = {}
            if "vit" in cfg.image_backbone or "deit" in cfg.image_backbone:
                kw["img_size"] = cfg.image_size
            self.backbone = timm.create_model(cfg.image_backbone, pretrained=False, num_classes=0, **kw)
        self.proj = nn.Linear(self.backbone.num_features, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(pixels.to(self.proj.weight.dtype))
        if f.dim() == 4:
            f = f.flatten(2).transpose(1, 2)
        return self.proj(f)


class CrossAttentionLayer(nn.Module):
    """Text queries attend to image keys/values (pre-norm), then an FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Lx.Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, t: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(img)
        t = t + self.attn(self.norm_q(t), kv, kv, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class CrossAttentionFusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(max(cfg.fusion_depth, 1)))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, image_tokens, text_tokens, text_mask):
        t = text_tokens
        for layer in self.layers:
            t = layer(t, image_tokens)
        return self.norm(t[:, 0])


class LinearFusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(4 * cfg.width, cfg.width)
        self.act = nn.GELU()

    def forward(self, image_tokens, text_tokens, text_mask):
        i, t = image_tokens.mean(dim=1), text_tokens[:, 0]
        return self.act(self.fc(torch.cat([i, t, i * t, (i - t).abs()], dim=-1)))


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.cfg = cfg
        self.image_tower = ImageTower(cfg)
        bcfg = BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                          num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                          max_position_embeddings=cfg.max_text_length, hidden_dropout_prob=cfg.dropout,
                          attention_probs_dropout_prob=cfg.dropout, pad_token_id=0)
        self.text_tower = BertModel(bcfg, add_pooling_layer=False)
        if cfg.text_pretrained:
            from mmpretrain.models.pretrained import load_bert_into_bert

            load_bert_into_bert(self.text_tower, cfg.text_pretrained)
        if cfg.grad_checkpointing:
            self.text_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.image_tower.backbone, "set_grad_checkpointing"):
                self.image_tower.backbone.set_grad_checkpointing(True)
        self.image_proj = Lx.Projection(cfg.width, cfg.embed_dim)
        self.text_proj = Lx.Projection(cfg.width, cfg.embed_dim)
        if cfg.fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(cfg)
        elif cfg.fusion == "linear":
            self.fusion = LinearFusion(cfg)
        else:
            raise ValueError(f"model.fusion: {cfg.fusion!r} is not 'cross_attention' or 'linear'")
        self.itm_head = Lx.ItmHead(cfg.width)
        for m in (self.image_proj, self.text_proj, self.fusion, self.itm_head):
            Lx.init_weights(m)

    def image_inputs(self, pixels):
        return self.image_tower(pixels)

    def text_inputs(self, input_ids, attention_mask):
        return self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def image_features(self, x):
        return x, self.image_proj(x.amax(dim=1) if self.cfg.image_pool == "max" else x.mean(dim=1))

    def text_features(self, x, attention_mask):
        if self.cfg.pool == "cls":
            return x, self.text_proj(x[:, 0])
        w = attention_mask.to(x.dtype).unsqueeze(-1)
        return x, self.text_proj((x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0))

    def encode_image(self, pixels):
        return self.image_features(self.image_inputs(pixels))

    def encode_text(self, input_ids, attention_mask):
        return self.text_features(self.text_inputs(input_ids, attention_mask), attention_mask)

    def fuse(self, image_tokens, text_tokens, text_mask):
        return self.fusion(image_tokens, text_tokens.to(image_tokens.dtype), text_mask)

    def itm_logits_from_fused(self, fused):
        return self.itm_head(fused)
