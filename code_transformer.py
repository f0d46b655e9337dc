"""The other prior over code maps: a small causal transformer over the 49 codes in raster order,
with the digit as a first token, and its key/value-cached sampler (`CodeTransformer.sample`).

codes (B, 7, 7) int64 and digit labels (B,) -> logits (B, K, 7, 7), as GatedPixelCNN; trained by
pixelcnn_prior.py --arch transformer.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import Sampled, next_codes, with_null_half


@dataclass
class CodeTransformerConfig:
    arch: ClassVar[str] = "transformer"
    k: int = 512               # codes per position (the VQ-VAE's K)
    width: int = 128           # the model width D, a multiple of heads
    num_layers: int = 4
    heads: int = 4
    num_classes: int = 10
    dropout: float = 0.1       # attention weights, attention and MLP outputs
    unconditional: bool = True  # label `num_classes` means "no digit" (for guidance)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token t sees tokens 0 .. t.

    Shapes: x (B, T, D) -> (B, T, D). With a cache (keys, values (B, heads, length, D / heads))
    x is the one token at position t (B, 1, D): its key and value are written at t and it attends
    to positions 0 .. t."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cache=None, t=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            keys, values = cache
            keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
            k, v = keys[:, :, :t + 1], values[:, :, :t + 1]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, t=None):
        x = x + self.dropout(self.attention(self.norm1(x), cache, t))
        return x + self.mlp(self.norm2(x))


class CodeTransformer(nn.Module):
    """Class-conditional autoregressive prior p(codes | digit), a drop-in for GatedPixelCNN.

    The input sequence is the digit's token followed by the first 48 codes; the output at position
    t predicts code t, so it sees the digit and codes 0 .. t-1. With `unconditional`, label
    `num_classes` (`null_label`) means "no digit" (label dropout, classifier-free guidance)."""

    def __init__(self, config, length=49):
        super().__init__()
        K, D = config.k, config.width
        self.K, self.length = K, length
        self.null_label = config.num_classes if config.unconditional else None
        self.code_embedding = nn.Embedding(K, D)
        self.class_embedding = nn.Embedding(config.num_classes + config.unconditional, D)
        self.position = nn.Parameter(torch.randn(length, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D, config.heads, config.dropout)
                                    for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, K)

    def forward(self, codes, labels):
        """codes (B, H, W), labels (B,) -> logits (B, K, H, W)."""
        B, H, W = codes.shape
        x = torch.cat([self.class_embedding(labels)[:, None],                  # (B, 1, D)
                       self.code_embedding(codes.flatten(1)[:, :-1])], 1)      # (B, 48, D)
        x = x + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2).reshape(B, self.K, H, W)

    @torch.no_grad()
    def sample(self, labels, temperature=1.0, guidance_scale=1.0, top_k=None, top_p=1.0,
               guidance_interval=None, return_details=False):
        """labels (B,) -> codes (B, H, W), one token at a time; each block keeps the keys and
        values of the tokens so far, so a step runs the network on one token. The options are
        GatedPixelCNN.sample's (`sampling.next_codes`)."""
        B, H, W = len(labels), 7, 7
        labels = with_null_half(self, labels, guidance_scale, return_details)
        N, D = len(labels), self.position.size(1)
        heads = self.blocks[0].attention.heads
        caches = [(self.position.new_zeros(N, heads, self.length, D // heads),
                   self.position.new_zeros(N, heads, self.length, D // heads))
                  for _ in self.blocks]
        codes = torch.zeros(B, H * W, dtype=torch.long, device=labels.device)
        all_logits, evidence = [], 0.0
        x = (self.class_embedding(labels) + self.position[0])[:, None]          # (N, 1, D)
        for t in range(H * W):
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache, t)
            logits, codes[:, t], evidence_here = next_codes(
                self.head(self.norm(x[:, 0])).float(), guidance_scale, temperature, top_k, top_p,
                guidance_interval, position=t, paired=N > B)
            all_logits.append(logits)                                            # (B, K)
            evidence = None if evidence_here is None else evidence + evidence_here
            if t + 1 < H * W:
                x = (self.code_embedding(codes[:, t]).repeat(N // B, 1) + self.position[t + 1])[:, None]
        codes = codes.view(B, H, W)
        if return_details:
            return Sampled(codes, torch.stack(all_logits, 2).view(B, self.K, H, W), evidence)
        return codes
