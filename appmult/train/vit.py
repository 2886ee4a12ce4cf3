"""A small Vision Transformer (Dosovitskiy et al. 2021) that trains on this CPU in minutes.

Patch embedding (one ``nn.Conv2d`` with stride = patch size), a class token and learned
position embeddings, pre-norm encoder blocks (``LayerNorm -> SelfAttention -> +``,
``LayerNorm -> Linear -> GELU -> Linear -> +``), a ``LayerNorm`` and a linear head on the
class token. Every weight multiplication sits in an ``nn.Conv2d`` or ``nn.Linear``; the
two activation-by-activation products of attention (QK^T and AV) are one call to
``torch.nn.functional.scaled_dot_product_attention`` in :class:`SelfAttention`, which is
what an approximate conversion routes through a multiplier's LUT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError
from ._checks import positive_int

__all__ = ["SelfAttention", "ViT"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` projection, scaled dot-product attention, ``proj``.

    Args:
        dim: token width, a multiple of ``heads``.
        heads: attention heads.

    Raises:
        InvalidValueError: ``dim`` is not a multiple of ``heads``.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InvalidValueError(f"ViT width {dim} must be a multiple of the head count {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Looked up on F at call time, so that appmult.nn.lut_sdpa can route it.
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for small images (8x8 digits, 28x28 MNIST, 32x32 CIFAR).

    The image is cut into a 4x4 grid of patches by default (patch size ``input_size // 4``:
    2 for digits, 7 for MNIST, 8 for CIFAR), so every data set gives 16 tokens plus the
    class token.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        input_size: image height and width.
        patch_size: patch height and width (default ``input_size // 4``); must divide ``input_size``.
        dim: token width.
        depth: encoder blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP blocks, in multiples of ``dim``.

    Raises:
        InvalidTypeError: a size that is not a positive integer.
        InvalidValueError: a patch size that does not divide the image, or a width that
            is not a multiple of the head count.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, *,
                 patch_size: int | None = None, dim: int = 32, depth: int = 2, heads: int = 2,
                 mlp_ratio: int = 2):
        super().__init__()
        for what, value in (("Input channel count", in_channels), ("Class count", num_classes),
                            ("Input size", input_size), ("Width", dim), ("Depth", depth),
                            ("Head count", heads), ("MLP ratio", mlp_ratio)):
            positive_int(what, value)
        patch = max(1, input_size // 4) if patch_size is None else positive_int("Patch size", patch_size)
        if input_size % patch:
            raise InvalidValueError(f"ViT patch size {patch} must divide the input size {input_size}")
        tokens = (input_size // patch) ** 2
        self.input_size, self.patch_size, self.dim = input_size, patch, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)                 # (N, tokens, dim)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])
