"""Vision Transformer, written here in the torchvision layout (no torchvision needed).

Structure and names as ``torchvision.models.vision_transformer``: ``conv_proj`` (the patch
embedding, ``Conv2d(C, E, k=p, s=p)``), ``class_token`` (1, 1, E), ``encoder`` with
``encoder.pos_embedding`` (1, N + 1, E), ``encoder.dropout``, ``encoder.layers`` (an
``nn.Sequential`` of ``encoder_layer_0 ..``) and ``encoder.ln``; ``heads.head`` (Linear). An
``EncoderBlock`` has ``ln_1``, ``self_attention`` (``nn.MultiheadAttention(E, H,
batch_first=True)``, called with ``need_weights=False`` as torchvision does), ``dropout``,
``ln_2`` and ``mlp`` (``Sequential(Linear, GELU, Dropout, Linear, Dropout)``, keys ``mlp.0`` /
``mlp.3``); its output is ``x + mlp(ln_2(x))`` with ``x = input + dropout(attn(ln_1(input)))``.
LayerNorm eps 1e-6. Keys such as ``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``
and ``heads.head.weight`` are torchvision's, so torchvision state dicts load (``weights=PATH``).

LRP (fisnet's rule table): the patch embedding reads the input directly, so the Zb rule applies
to it (the model does not normalise inside: normalise the data, and give ``bounds``); attention by
the "attention" rule ("cp", the default, or "attnlrp"), LayerNorm with σ held constant, GELU by
the identity rule. The class token and the position embedding are input-independent additions:
like biases, they absorb relevance (docs/vit.md gives how much on the demo model).

LDS maps on the patch grid: each block ends with ``grid`` (:class:`TokenGrid`), a parameter-free
module that takes the block's patch tokens (B, N, E) and returns them as a map (B, E, h, w) — the
values unchanged; the block then puts them back into the token sequence after the class token.
The encoder does the same with the embedding (patch tokens plus their position embedding, after
``encoder.dropout``) at ``encoder.grid``: its map holds the relevance the position embedding
absorbs, which the input map does not show. So the default LDS layers (``model.lds_layers``) are
``encoder.grid`` and ``encoder.layers.encoder_layer_i.grid``, and their relevance maps are
(B, M, E, h, w), the shape the ISNet heatmap loss takes (E as channels, masks resized to h x w).
The class token's relevance at a block output is not in that map. The last block is left out of
the defaults: only its class token reaches the head, so the relevance of its patch tokens is zero
(a 1-block ViT's only default LDS layer is the embedding).

Configurations: ``vit_tiny`` (E 192, 3 heads, 12 blocks, MLP 768; DeiT-Tiny's sizes; torchvision
has no ViT-Tiny) and ``vit_small`` (E 384, 6 heads, 12 blocks, MLP 1536), both 224 px with
16 px patches by default; ``vit_digits``: a CPU-sized ViT for the demo's 36 x 36 digits (4 px
patches: a 9 x 9 grid whose outer ring is exactly the digits' 4 px marker band; E 64, 4 heads,
4 blocks, MLP 128). Every builder takes ``image_size`` and ``patch_size``. An input of another
size than ``image_size`` is accepted: the position embedding of the patch grid is resized by
bilinear interpolation (a function of the parameters only, so LRP treats it like a bias); a side
that is not a multiple of the patch size loses its last ``side % p`` pixels (the conv's floor).

Initialisation as torchvision (patch conv truncated normal std sqrt(1/fan_in), position
embedding normal std 0.02, class token zero, MLP Xavier-uniform with biases normal std 1e-6)
except the head: truncated normal std 0.02 instead of torchvision's zeros, since a zero head gives
all-zero heatmaps (no heatmap-loss gradient) at the first step.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import with_weights

__all__ = ["VisionTransformer", "EncoderBlock", "Encoder", "MLPBlock", "TokenGrid", "ConvStemConfig", "vit_tiny",
           "vit_small", "vit_digits", "vit_digits_stem"]


class ConvStemConfig(NamedTuple):
    """One layer of a convolutional stem (torchvision's ``ConvStemConfig``, Xiao et al. 2021, "Early
    convolutions help transformers see better"): Conv(k, stride, padding (k-1)//2, no bias) →
    BatchNorm → ReLU. A plain ``(out_channels, kernel_size, stride)`` tuple is accepted too."""
    out_channels: int
    kernel_size: int
    stride: int


def _conv_stem(in_channels: int, hidden_dim: int, configs: Sequence) -> nn.Sequential:
    """torchvision's stem layout: ``conv_bn_relu_i`` (``0`` conv, ``1`` BatchNorm, ``2`` ReLU) for
    each config, then ``conv_last``, a 1x1 conv to the hidden size (keys as torchvision's)."""
    seq = nn.Sequential()
    prev = in_channels
    for i, cfg in enumerate(configs):
        out, k, stride = (int(v) for v in cfg)
        seq.add_module(f"conv_bn_relu_{i}", nn.Sequential(
            nn.Conv2d(prev, out, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)))
        prev = out
    seq.add_module("conv_last", nn.Conv2d(prev, hidden_dim, kernel_size=1))
    return seq


class TokenGrid(nn.Module):
    """Patch tokens (B, N, E) → a map (B, E, h, w) on the patch grid (values unchanged).
    ``to_tokens`` is the inverse. Parameter-free; the LDS layer of a block and of the embedding."""

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, N, E = tokens.shape
        h, w = grid
        if h * w != N:
            raise ValueError(f"{N} patch tokens do not fill a {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(B, E, h, w)

    @staticmethod
    def to_tokens(g: torch.Tensor) -> torch.Tensor:
        return g.flatten(2).transpose(1, 2)

    def around(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """A token sequence (B, 1 + N, E) with its patch tokens passed through this module (the LDS
        layer's output) and put back after the class token; values unchanged."""
        return torch.cat([x[:, :1], self.to_tokens(self(x[:, 1:], grid))], dim=1)


class MLPBlock(nn.Sequential):
    """Linear(E, D) → GELU → Dropout → Linear(D, E) → Dropout (keys ``0`` and ``3``)."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; see the module docstring."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)
        self.grid = TokenGrid()

    def forward(self, input: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if input.dim() != 3:
            raise ValueError(f"expected (batch, tokens, hidden) got shape {tuple(input.shape)}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        out = x + y
        if grid is None:
            return out
        return self.grid.around(out, grid)  # the LDS layer: patch tokens as (B, E, h, w)


class Encoder(nn.Module):
    """pos_embedding → dropout → encoder_layer_0 .. → ln (torchvision's ``Encoder``)."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.grid = TokenGrid()

    def forward(self, input: torch.Tensor, grid: Optional[Tuple[int, int]] = None,
                pos_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() != 3:
            raise ValueError(f"expected (batch, tokens, hidden) got shape {tuple(input.shape)}")
        x = self.dropout(input + (self.pos_embedding if pos_embedding is None else pos_embedding))
        if grid is not None:
            x = self.grid.around(x, grid)  # the embedding's LDS layer: patch tokens + position embedding
        for layer in self.layers:
            x = layer(x, grid)
        return self.ln(x)


class VisionTransformer(nn.Module):
    """torchvision-style ViT (class-token pooling). ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("heads",)

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0, num_classes: int = 1000,
                 in_channels: int = 3, conv_stem_configs: Optional[Sequence] = None) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size})")
        if num_layers < 1 or num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(f"need num_layers >= 1 and hidden_dim ({hidden_dim}) divisible by num_heads "
                             f"({num_heads})")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.mlp_dim, self.num_classes = mlp_dim, num_classes
        if conv_stem_configs:
            stride = math.prod(int(c[2]) for c in conv_stem_configs)
            if stride != patch_size:
                raise ValueError(f"the conv stem's strides multiply to {stride}, not the patch size {patch_size}: "
                                 "the stem must map each patch to one token")
            self.conv_proj: nn.Module = _conv_stem(in_channels, hidden_dim, conv_stem_configs)
        else:
            self.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        side = image_size // patch_size
        self.seq_length = side * side + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(self.seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        if isinstance(self.conv_proj, nn.Conv2d):
            fan_in = in_channels * patch_size * patch_size
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        else:  # torchvision's init of the stem's last conv; the stem convs keep PyTorch's default
            last = self.conv_proj.conv_last
            nn.init.normal_(last.weight, mean=0.0, std=math.sqrt(2.0 / last.out_channels))
            nn.init.zeros_(last.bias)
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)
        self.lds_layers = ("encoder.grid",) + tuple(f"encoder.layers.encoder_layer_{i}.grid"
                                                    for i in range(num_layers - 1))

    def _pos_embedding(self, h: int, w: int) -> Optional[torch.Tensor]:
        """The position embedding for an h x w patch grid (None: the configured one)."""
        side = self.image_size // self.patch_size
        if (h, w) == (side, side):
            return None
        pe = self.encoder.pos_embedding
        grid = pe[:, 1:].transpose(1, 2).reshape(1, self.hidden_dim, side, side)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def _process_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        n, _, H, W = x.shape
        p = self.patch_size
        if H < p or W < p:
            raise ValueError(f"image {H}x{W} is smaller than one {p}x{p} patch; use a smaller patch_size")
        x = self.conv_proj(x)
        h, w = x.shape[-2:]
        if (h, w) != (H // p, W // p):  # a conv stem whose strides do not tile the image like the patches
            raise ValueError(f"the patch embedding made a {h}x{w} grid of a {H}x{W} image, not {H // p}x{W // p}")
        return x.reshape(n, self.hidden_dim, h * w).permute(0, 2, 1), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x, grid, self._pos_embedding(*grid))
        return self.heads(x[:, 0])


def _vit(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
         num_classes, in_channels, weights, conv_stem_configs=None):
    return with_weights(VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                                          dropout, attention_dropout, num_classes, in_channels, conv_stem_configs),
                        weights)


def vit_tiny(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 224, patch_size: int = 16,
             dropout: float = 0.0, attention_dropout: float = 0.0, weights=None) -> VisionTransformer:
    """ViT-Tiny: E 192, 3 heads, 12 blocks, MLP 768 (DeiT-Tiny's sizes), 16 px patches of 224 px images."""
    return _vit(image_size, patch_size, 12, 3, 192, 768, dropout, attention_dropout, num_classes, in_channels,
                weights)


def vit_small(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 224, patch_size: int = 16,
              dropout: float = 0.0, attention_dropout: float = 0.0, weights=None) -> VisionTransformer:
    """ViT-Small: E 384, 6 heads, 12 blocks, MLP 1536, 16 px patches of 224 px images."""
    return _vit(image_size, patch_size, 12, 6, 384, 1536, dropout, attention_dropout, num_classes, in_channels,
                weights)


def vit_digits(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 36, patch_size: int = 4,
               num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 128,
               dropout: float = 0.0, attention_dropout: float = 0.0, weights=None,
               conv_stem_configs: Optional[Sequence] = None) -> VisionTransformer:
    """A CPU-sized ViT for the demo's 36 x 36 digits: 4 px patches (9 x 9 grid), E 64, 4 heads,
    4 blocks, MLP 128 (all configurable)."""
    return _vit(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                num_classes, in_channels, weights, conv_stem_configs)


def vit_digits_stem(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 36, num_layers: int = 4,
                    num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 128, dropout: float = 0.0,
                    attention_dropout: float = 0.0, weights=None,
                    conv_stem_configs: Sequence = ((16, 3, 2), (32, 3, 2))) -> VisionTransformer:
    """``vit_digits`` with a convolutional stem in place of the 4 px patch convolution (torchvision's
    ``conv_stem_configs``): two 3x3 stride-2 Conv-BN-ReLU layers (16 and 32 channels) and a 1x1 conv to
    E, the same 9 x 9 token grid. Measured on the demo's digits: a better plain ViT on 4,000 images
    (docs/vit.md)."""
    return _vit(image_size, 4, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                num_classes, in_channels, weights, conv_stem_configs)
