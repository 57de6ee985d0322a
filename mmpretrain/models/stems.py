"""The image stems, in timm's layout without importing timm.

``PatchEmbed`` (a ViT's linear patch projection) and ``hybrid_stem`` (the R+ViT hybrid
embedding of timm's ``vit_tiny_r_s16_p8_224``: a ResNetV2 "same" stem, then a strided patch
conv) hold the parameters, buffers and module names of ``timm.layers.PatchEmbed`` and
``timm.layers.HybridEmbed(create_resnetv2_stem(..., stem_type='same', preact=False,
conv_layer=StdConv2dSame))``, create them in the same order (so the same seed gives the same
initial weights) and compute the same function: tests/unit/test_models.py checks both against
timm, bit for bit. They exist because ``import timm`` costs about 5 s of CPU per process (timm
imports every model definition and torchvision, whose ``ops`` imports ``torch._dynamo``), paid
by every training rank, evaluation and export process although the model needs four small
layers. timm is still what the exports are loaded into (mmpretrain/export).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding of ``x`` for a kernel/stride (dilation 1), as timm's ``pad_same``."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride[0]) - 1) * stride[0] + kernel[0] - ih, 0)
    pad_w = max((math.ceil(iw / stride[1]) - 1) * stride[1] + kernel[1] - iw, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (per output channel, no batch statistics) and 'SAME'
    padding for a strided kernel (timm's ``StdConv2dSame``; bias-free)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float = 1e-8):
        static = stride == 1 and (kernel_size - 1) % 2 == 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(kernel_size - 1) // 2 if static else 0, bias=False)
        self.same_pad = not static
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = _same_pad(x, self.kernel_size, self.stride)
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm then ReLU (timm's ``GroupNormAct`` with its defaults: eps 1e-5, affine)."""

    def __init__(self, num_channels: int, num_groups: int = 32):
        super().__init__(num_groups, num_channels, eps=1e-5, affine=True)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class MaxPool2dSame(nn.MaxPool2d):
    """Max-pool with 'SAME' padding (padded with -inf), timm's ``MaxPool2dSame``."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__((kernel_size, kernel_size), (stride, stride), (0, 0), (1, 1), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.kernel_size, self.stride, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), self.dilation, self.ceil_mode)


class PatchEmbed(nn.Module):
    """Image to patch tokens: a ``patch_size`` strided conv, flattened to (B, N, C) (timm's
    ``PatchEmbed`` with its defaults: bias, no norm, a fixed image size)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != self.img_size:
            raise ValueError(f"image of {h}x{w} px, the model takes {self.img_size[0]}x{self.img_size[1]}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class HybridEmbed(nn.Module):
    """A CNN stem's feature map, then a ``patch_size`` strided conv to ``embed_dim``, flattened
    to (B, N, C) (timm's ``HybridEmbed``: ``backbone``, ``proj``)."""

    def __init__(self, backbone: nn.Module, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        with torch.no_grad():  # the feature map's size, as timm finds it: a forward pass in eval mode
            training = [(m, m.training) for m in backbone.modules()]
            try:
                backbone.eval()
                feat = backbone(torch.zeros(1, in_chans, img_size, img_size))
            finally:
                for module, was_training in training:
                    module.training = was_training
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.feature_size = tuple(feat.shape[-2:])
        self.feature_dim = feat.shape[1]
        if self.feature_size[0] % patch_size or self.feature_size[1] % patch_size:
            raise ValueError(f"the stem's {self.feature_size} feature map does not tile into {patch_size}-patches")
        self.grid_size = (self.feature_size[0] // patch_size, self.feature_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(self.feature_dim, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


def hybrid_stem(image_size: int, patch_size: int, width: int) -> HybridEmbed:
    """The ResNetV2 'same' stem (7x7 stride-2 weight-standardised conv to 64 channels, eps 1e-8;
    GroupNorm(32) + ReLU; 3x3 stride-2 'SAME' max-pool) and a ``patch_size`` conv to ``width``."""
    backbone = nn.Sequential(OrderedDict(conv=StdConv2dSame(3, 64, 7, stride=2, eps=1e-8), norm=GroupNormAct(64, 32),
                                         pool=MaxPool2dSame(3, stride=2)))
    return HybridEmbed(backbone, img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=width)
