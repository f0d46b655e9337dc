"""The prior over code maps: a class-conditional Gated PixelCNN and its sampler (`GatedPixelCNN.sample`).

codes (B, 7, 7) int64 and digit labels (B,) -> logits (B, K, 7, 7); trained by pixelcnn_prior.py.
"""


import torch
import torch.nn as nn


class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al. 2016, "Conditional Image Generation with
    PixelCNN Decoders", figure 2): a vertical stack that sees only the rows above and a horizontal
    stack that sees the pixels to the left in the current row, tanh * sigmoid gates, and the class
    embedding added to both gates (eq. 4). Splitting the stacks removes the PixelCNN blind spot.

    Shapes: x_v, x_h (B, C, H, W) -> (B, C, H, W), (B, C, H, W); class_bias (B, 2C).
    """

    def __init__(self, dim, kernel, first):
        super().__init__()
        self.first = first  # mask 'A': the current position itself is hidden
        half = kernel // 2
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
    def gate(x):
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def vertical_step(self, x_v, bias):
        """x_v (B, C, H, W) -> pre-gate h_vertical (B, 2C, H, W), gated out_v (B, C, H, W)."""
        h_vertical = self.vertical(x_v)[:, :, :x_v.size(2), :]
        return h_vertical, self.gate(h_vertical + bias)

    def horizontal_step(self, h_vertical, x_h, bias):
        """x_h (B, C, H', W) with the matching rows of h_vertical -> out_h (B, C, H', W)."""
        h_horizontal = self.horizontal(x_h)[:, :, :, :x_h.size(3)]
        out = self.gate(self.vertical_to_horizontal(h_vertical) + h_horizontal + bias)
        out_h = self.horizontal_out(out)
        return out_h if self.first else out_h + x_h

    def forward(self, x_v, x_h, class_bias):
        bias = class_bias[:, :, None, None]
        h_vertical, out_v = self.vertical_step(x_v, bias)
        return out_v, self.horizontal_step(h_vertical, x_h, bias)


class GatedPixelCNN(nn.Module):
    """Class-conditional autoregressive prior p(codes | digit) over (H, W) maps of K-way codes.

    codes (B, H, W) int64, labels (B,) -> logits (B, K, H, W); the logits at (i, j) depend only on
    the codes before (i, j) in raster order."""

    def __init__(self, K=512, dim=64, num_layers=12, num_classes=10):
        super().__init__()
        self.K = K
        self.embedding = nn.Embedding(K, dim)
        self.class_embedding = nn.Embedding(num_classes, 2 * dim * num_layers)
        self.layers = nn.ModuleList(
            GatedMaskedConv2d(dim, 7 if i == 0 else 3, first=i == 0) for i in range(num_layers))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, 4 * dim, 1), nn.ReLU(),
                                    nn.Conv2d(4 * dim, K, 1))

    def forward(self, codes, labels):
        return self.output(self.stacks_embedded(self.embedding(codes).permute(0, 3, 1, 2), labels))

    def stacks_embedded(self, x, labels):
        """x (B, dim, H, W) embedded codes -> features (B, dim, H, W)."""
        biases = self.class_embedding(labels).chunk(len(self.layers), dim=1)
        x_v = x_h = x
        for layer, bias in zip(self.layers, biases):
            x_v, x_h = layer(x_v, x_h, bias)
        return x_h

    @torch.no_grad()
    def sample(self, labels, shape=(7, 7), temperature=1.0):
        """labels (B,) -> codes (B, H, W), one position at a time in raster order.

        The vertical stacks at row i see only rows < i, so they run once per row; within the row
        only the horizontal stacks of that one row (B, C, 1, W) run again for each position."""
        codes = torch.zeros(len(labels), *shape, dtype=torch.long, device=labels.device)
        biases = [b[:, :, None, None] for b in
                  self.class_embedding(labels).chunk(len(self.layers), dim=1)]
        for i in range(shape[0]):
            x_v = self.embedding(codes[:, :i + 1]).permute(0, 3, 1, 2)    # (B, dim, i+1, W)
            vertical_rows = []
            for layer, bias in zip(self.layers, biases):
                h_vertical, x_v = layer.vertical_step(x_v, bias)
                vertical_rows.append(h_vertical[:, :, i:i + 1])           # (B, 2 dim, 1, W)
            for j in range(shape[1]):
                x_h = self.embedding(codes[:, i:i + 1]).permute(0, 3, 1, 2)  # (B, dim, 1, W)
                for layer, bias, h_vertical in zip(self.layers, biases, vertical_rows):
                    x_h = layer.horizontal_step(h_vertical, x_h, bias)
                logits = self.output(x_h[:, :, :, j:j + 1])[:, :, 0, 0].float()   # (B, K)
                probs = torch.softmax(logits / temperature, 1)
                codes[:, i, j] = torch.multinomial(probs, 1).squeeze(1)
        return codes
