"""The prior over code maps: a class-conditional Gated PixelCNN and its sampler (`GatedPixelCNN.sample`).

codes (B, 7, 7) int64 and digit labels (B,) -> logits (B, K, 7, 7); trained by pixelcnn_prior.py.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import Sampled, next_codes, with_null_half


@dataclass
class GatedPixelCNNConfig:
    arch: ClassVar[str] = "gated_pixelcnn"
    k: int = 512               # codes per position (the VQ-VAE's K)
    channels: int = 64         # per position, in both stacks
    num_layers: int = 12
    num_classes: int = 10
    dropout: float = 0.1       # on every layer's gated outputs
    unconditional: bool = True  # label `num_classes` means "no digit" (for guidance)
    shift_augment: int = 0     # trained also on the maps of images shifted by up to this many
                               # pixels, told the shift (forward's `shifts`); it models, samples
                               # and is evaluated on the unshifted maps


class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al. 2016, "Conditional Image Generation with
    PixelCNN Decoders", figure 2): a vertical stack that sees only the rows above and a horizontal
    stack that sees the pixels to the left in the current row, tanh * sigmoid gates, and the class
    embedding added to both gates (eq. 4). Splitting the stacks removes the PixelCNN blind spot.

    Shapes: x_v, x_h (B, C, H, W) -> (B, C, H, W), (B, C, H, W); class_bias (B, 2C).
    """

    def __init__(self, dim, kernel, first, dropout=0.0):
        super().__init__()
        self.first = first  # mask 'A': the current position itself is hidden
        self.half = half = kernel // 2
        # Causal by shape, not by a mask: a kernel that has no tap on the hidden row or column cannot
        # see it, whatever its weights, device or copy. Padded by `half` and cropped to the first H
        # output rows, a kernel of `rows` rows makes row i see rows i - half .. i - half + rows - 1
        # of the layer below: up to row i itself, or (first layer) up to row i - 1 only.
        rows, columns = (half, half) if first else (half + 1, half + 1)
        self.vertical = nn.Conv2d(dim, 2 * dim, (rows, kernel), padding=(half, half))
        self.vertical_to_horizontal = nn.Conv2d(2 * dim, 2 * dim, 1)
        # Horizontal, likewise: column j sees columns j - half .. j (first layer: .. j - 1).
        self.horizontal = nn.Conv2d(dim, 2 * dim, (1, columns), padding=(0, half))
        self.horizontal_out = nn.Conv2d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)  # on both stacks' gated outputs; no weights
        if first:
            self._register_load_state_dict_pre_hook(self._drop_masked_taps)

    def _drop_masked_taps(self, state_dict, prefix, *_):
        """Priors written before the first layer was causal by shape kept the hidden row and column
        as zeroed weights: drop them, which leaves the function unchanged."""
        for name, dim in (("vertical", 2), ("horizontal", 3)):
            key = f"{prefix}{name}.weight"
            wanted = getattr(self, name).weight.size(dim)
            if key in state_dict and state_dict[key].dim() == 4 and \
                    state_dict[key].size(dim) == wanted + 1:
                state_dict[key] = state_dict[key].narrow(dim, 0, wanted)

    @staticmethod
    def gate(x, dim=1):
        a, b = x.chunk(2, dim=dim)
        return torch.tanh(a) * torch.sigmoid(b)

    def vertical_step(self, x_v, bias):
        """x_v (B, C, H, W) -> pre-gate h_vertical (B, 2C, H, W), gated out_v (B, C, H, W)."""
        h_vertical = self.vertical(x_v)[:, :, :x_v.size(2), :]
        return h_vertical, self.dropout(self.gate(h_vertical + bias))

    def vertical_row(self, x_v, bias):
        """One output row from the input rows its kernel sees, channels last, zero padded above and
        on both sides (the sampler's row loop): x_v (B, rows, half + W + half, C), bias (B, 2C) ->
        h_vertical (B, W, 2C), out_v (B, W, C)."""
        # Channels-last memory seen as (B, C, rows, half + W + half): no copy into patches
        h_vertical = F.conv2d(x_v.permute(0, 3, 1, 2), self.vertical.weight, self.vertical.bias)
        h_vertical = h_vertical.permute(0, 2, 3, 1).flatten(1, 2)         # (B, 1, W, 2C) -> (B, W, 2C)
        return h_vertical, self.dropout(self.gate(h_vertical + bias[:, None], dim=-1))

    def horizontal_step(self, h_vertical, x_h, bias):
        """x_h (B, C, H', W) with the matching rows of h_vertical -> out_h (B, C, H', W)."""
        h_horizontal = self.horizontal(x_h)[:, :, :, :x_h.size(3)]
        out = self.gate(self.vertical_to_horizontal(h_vertical) + h_horizontal + bias)
        out_h = self.horizontal_out(self.dropout(out))
        return out_h if self.first else out_h + x_h

    def horizontal_position(self, vertical_term, x_h):
        """One output position from the inputs its kernel sees, channels last (the sampler's inner
        loop): vertical_term (B, 2C), the position's `vertical_to_horizontal(h_vertical) + bias`,
        computed once per row; x_h (B, `horizontal.kernel_size[1]`, C) ending at the position (the
        one before it, first layer) -> out_h (B, C)."""
        out = self.gate(vertical_term + pointwise(self.horizontal, x_h.flatten(1)))
        out_h = pointwise(self.horizontal_out, self.dropout(out))
        return out_h if self.first else out_h + x_h[:, -1]

    def forward(self, x_v, x_h, class_bias):
        bias = class_bias[:, :, None, None]
        h_vertical, out_v = self.vertical_step(x_v, bias)
        return out_v, self.horizontal_step(h_vertical, x_h, bias)


def pointwise(conv, x):
    """A convolution applied at one position as a matrix product: x (..., kh * kw * in), its
    kernel's window flattened channels last -> (..., out)."""
    return F.linear(x, conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)


class GatedPixelCNN(nn.Module):
    """Class-conditional autoregressive prior p(codes | digit) over (H, W) maps of K-way codes.

    codes (B, H, W) int64, labels (B,) -> logits (B, K, H, W); the logits at (i, j) depend only on
    the codes before (i, j) in raster order. With `unconditional`, label `num_classes` (`null_label`)
    means "no digit": trained with label dropout, one model is both p(codes | digit) and p(codes),
    which classifier-free guidance needs.

    With `shift_augment` R, a second embedding tells it which of the (2R + 1)^2 pixel shifts of the
    image the map was encoded from (index 0: none), added to the class embedding: distribution
    augmentation (Jun et al. 2020), more maps to learn from without making p(codes | digit) the
    shifted maps' distribution."""

    def __init__(self, config):
        super().__init__()
        K, C, L = config.k, config.channels, config.num_layers
        self.K = K
        self.null_label = config.num_classes if config.unconditional else None
        self.embedding = nn.Embedding(K, C)
        self.class_embedding = nn.Embedding(config.num_classes + config.unconditional, 2 * C * L)
        self.shift_embedding = None
        if config.shift_augment:
            self.shift_embedding = nn.Embedding((2 * config.shift_augment + 1) ** 2, 2 * C * L)
            nn.init.zeros_(self.shift_embedding.weight)   # starts as if every map were unshifted
        self.layers = nn.ModuleList(
            GatedMaskedConv2d(C, 7 if i == 0 else 3, first=i == 0, dropout=config.dropout)
            for i in range(L))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(C, 4 * C, 1), nn.ReLU(),
                                    nn.Conv2d(4 * C, K, 1))

    def forward(self, codes, labels, shifts=None):
        """codes (B, H, W), labels (B,), shifts (B,) or None (unshifted) -> logits (B, K, H, W)."""
        biases = self.conditioning(labels, shifts).chunk(len(self.layers), dim=1)
        return self.output(self.stacks_embedded(self.embedding(codes).permute(0, 3, 1, 2), biases))

    def conditioning(self, labels, shifts=None):
        """labels (B,), shifts (B,) or None (unshifted) -> every layer's class bias (B, 2C * L)."""
        embedded = self.class_embedding(labels)
        if self.shift_embedding is None:
            return embedded
        return embedded + (self.shift_embedding.weight[0] if shifts is None else
                           self.shift_embedding(shifts))

    def stacks_embedded(self, x, biases):
        """x (B, dim, H, W) embedded codes, per layer its class bias (B, 2C) -> features
        (B, dim, H, W)."""
        x_v = x_h = x
        for layer, bias in zip(self.layers, biases):
            x_v, x_h = layer(x_v, x_h, bias)
        return x_h

    @torch.no_grad()
    def sample(self, labels, temperature=1.0, guidance_scale=1.0, top_k=None, top_p=1.0,
               guidance_interval=None, return_details=False):
        """labels (B,) -> codes (B, H, W), one position at a time in raster order (in eval mode).

        Each layer's inputs are cached as they are produced, so every position costs one pass of
        each layer over the few inputs its kernel sees, like a transformer's key/value cache.
        Guidance, temperature, top-k and top-p: `sampling.next_codes`; when guiding (or with
        return_details), the null-label half of the batch runs alongside. With return_details,
        `sampling.Sampled`: also the guided logits each code was drawn from and the evidence of
        the codes for their digit."""
        B, H, W = len(labels), 7, 7
        labels = with_null_half(self, labels, guidance_scale, return_details)
        biases = self.conditioning(labels).chunk(len(self.layers), dim=1)        # (N, 2C) each
        N, C, first = len(labels), self.embedding.embedding_dim, self.layers[0].half
        # Every layer's vertical input, channels last, with zeros where its kernel overhangs the
        # map: (N, half + H, half + W + half, C).
        v_in = [self.embedding.weight.new_zeros(N, l.half + H, l.half + W + l.half, C)
                for l in self.layers]
        codes = torch.zeros(B, H, W, dtype=torch.long, device=labels.device)
        all_logits, evidence = [], 0.0
        for i in range(H):
            vertical_terms = self._vertical_row(v_in, biases, i)
            h_in = [v_in[0].new_zeros(N, l.half + W, C) for l in self.layers]   # this row's
            for j in range(W):
                logits, codes[:, i, j], evidence_here = next_codes(
                    self._logits_at(h_in, vertical_terms, j), guidance_scale, temperature, top_k,
                    top_p, guidance_interval, position=i * W + j, paired=N > B)
                all_logits.append(logits)                                    # (B, K)
                evidence = None if evidence_here is None else evidence + evidence_here
                embedded = self.embedding(codes[:, i, j]).repeat(N // B, 1)
                h_in[0][:, first + j] = embedded
                v_in[0][:, first + i, first + j] = embedded
        if return_details:
            return Sampled(codes, torch.stack(all_logits, 2).view(B, self.K, H, W), evidence)
        return codes

    def _vertical_row(self, v_in, biases, i):
        """The vertical stacks at row i from the cached rows above it; writes each layer's out_v
        into the next layer's input v_in[l + 1] and -> per layer the row's share of the
        horizontal gate, vertical_to_horizontal(h_vertical) + bias (N, W, 2C)."""
        terms = []
        for l, (layer, bias) in enumerate(zip(self.layers, biases)):
            h_row, out_v = layer.vertical_row(v_in[l][:, i:i + layer.vertical.kernel_size[0]],
                                              bias)                     # (N, W, 2C), (N, W, C)
            terms.append(pointwise(layer.vertical_to_horizontal, h_row) + bias[:, None])
            if l + 1 < len(self.layers):
                half = self.layers[l + 1].half
                v_in[l + 1][:, half + i, half:half + out_v.size(1)] = out_v
        return terms

    def _logits_at(self, h_in, vertical_terms, j):
        """The horizontal stacks at column j of the current row, from its cached columns (h_in:
        per layer (N, half + W, C), zeros on the left); writes each layer's out_h into the next
        layer's input -> logits (N, K) float32."""
        for l, layer in enumerate(self.layers):
            out_h = layer.horizontal_position(vertical_terms[l][:, j],
                                              h_in[l][:, j:j + layer.horizontal.kernel_size[1]])
            if l + 1 < len(self.layers):
                h_in[l + 1][:, self.layers[l + 1].half + j] = out_h
        head = self.output   # ReLU, 1x1 conv, ReLU, 1x1 conv
        return pointwise(head[3], F.relu(pointwise(head[1], F.relu(out_h)))).float()
