"""The VQ-VAE's networks (encoder, codebook, decoder) and its config, `VQVAEConfig`.

Model shapes (B images, D = --hidden-size, K = --k):
    x (B, 1, 28, 28) in [-1, 1] -> encoder -> z_e_x (B, D, 7, 7) -> codebook -> indices (B, 7, 7)
    -> z_q_x (B, D, 7, 7) -> decoder -> x_tilde (B, 1, 28, 28) in [-1, 1]

The quantizer (`--quantizer vq`: the codebook, its lookup, straight-through gradient, EMA update and
restarts; or fsq, lfq, simvq) is in vector_quantizer.py; the priors over codes in gated_pixelcnn.py
and code_transformer.py, the judges of generated digits in judges.py.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from vector_quantizer import FSQ_LEVELS, make_quantizer
# The original modules.py defined these; code written against it imports them from here.
from vector_quantizer import VQEmbedding, vq, vq_st  # noqa: F401


def to_scalar(arr):
    """The original's helper: a tensor (or a list of them) -> Python number(s)."""
    return [x.item() for x in arr] if isinstance(arr, list) else arr.item()


def weights_init(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(m.weight.data)
        m.bias.data.fill_(0)


class ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 3, 1, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 1),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x):
        return x + self.block(x)


class VectorQuantizedVAE(nn.Module):
    """The original's network: 28x28 -> 7x7 by two 4x4 stride-2 convs and two residual blocks, mirrored
    in the decoder, which ends in Tanh. Codebook options are passed on to `VQEmbedding` (quantizer
    'vq'); the other quantizers of vector_quantizer.py sit in the same place (`codeBook`)."""

    def __init__(self, input_dim, dim, K=512, codebook="loss", codebook_init="uniform", decay=0.99,
                 dead_code_threshold=0.0, gradient="straight-through", conv_init_scale=1.0,
                 latent_init_scale=1.0, quantizer="vq", fsq_levels=FSQ_LEVELS):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 4, 2, 1),
            ResBlock(dim),
            ResBlock(dim),
        )
        self.codeBook = make_quantizer(quantizer, K, dim, fsq_levels, codebook=codebook,
                                       init=codebook_init, decay=decay,
                                       dead_code_threshold=dead_code_threshold, gradient=gradient)
        self.decoder = nn.Sequential(
            ResBlock(dim),
            ResBlock(dim),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim, input_dim, 4, 2, 1),
            nn.Tanh(),
        )
        self.apply(weights_init)
        self._rescale_init(conv_init_scale, latent_init_scale)

    @torch.no_grad()
    def _rescale_init(self, conv_scale, latent_scale):
        """Multiply parts of the original's Xavier init (1, 1: the original's init). In training mode the
        network computes the same function afterwards, up to the factor `latent_scale` on z_e(x)."""
        # A conv followed by BatchNorm is scale-free: BatchNorm divides its scale out. Adam moves
        # every weight by ~lr per step whatever its size, so smaller weights turn faster: for these
        # layers the init scale sets the effective learning rate (about lr / |w|). The running
        # variance starts scaled alike, or eval mode would divide by a variance 1/scale^2 too large
        # until the EMA forgets its start (a short run's eval-mode codes collapsed onto 1-3 codes).
        for seq in self.modules():
            if isinstance(seq, nn.Sequential):
                for layer, following in zip(seq, seq[1:]):
                    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and \
                            isinstance(following, nn.BatchNorm2d):
                        layer.weight.mul_(conv_scale)
                        following.running_var.mul_(conv_scale ** 2)
        # z_e(x) is the residual stream conv(h) + block_1 + block_2: scaling that conv's weights and
        # each block's last BatchNorm gain scales z_e(x). The commitment loss beta ||z_e - sg[e]||^2
        # is measured in these units, so a smaller latent is held less tightly at the same beta.
        self.encoder[3].weight.mul_(latent_scale)
        for block in self.encoder[4:]:
            block.block[-1].weight.mul_(latent_scale)

    def encode(self, x):
        """(B, 1, 28, 28) -> code indices (B, 7, 7)."""
        return self.codeBook(self.encoder(x))

    def decode(self, latents):
        """code indices (B, 7, 7) -> images (B, 1, 28, 28)."""
        return self.decoder(self.codeBook.codewords(latents))            # (B, D, 7, 7) in between

    def forward(self, x, return_quantized=False):
        """-> (x_tilde, z_e_x, z_q_x) as in the original; with return_quantized, (x_tilde, the
        quantizer's `Quantized`), what training needs."""
        z_e_x = self.encoder(x)
        quantized = self.codeBook.quantize(z_e_x)
        x_tilde = self.decoder(quantized.codes)
        return (x_tilde, quantized) if return_quantized else (x_tilde, z_e_x, quantized.z_q_x)


@dataclass
class VQVAEConfig:
    """What a VQ-VAE checkpoint is rebuilt from. The defaults are VQ-VAE.py's (chosen by the ablation
    in RESULTS.md); `ORIGINAL_CONFIG` is the original repo's model. The fields from `codebook` to
    `gradient` are the 'vq' quantizer's; the other quantizers leave them at their defaults."""
    hidden_size: int = 40                 # D, the codeword size
    k: int = 512                          # K, the number of codes
    quantizer: str = "vq"                 # vq, fsq, lfq or simvq (vector_quantizer.py)
    fsq_levels: tuple = FSQ_LEVELS        # fsq: levels per channel, K = their product
    codebook: str = "ema"                 # "loss" (the paper's codebook loss) or "ema"
    codebook_init: str = "kmeans"         # "uniform" (the original's) or k-means on the first batch
    ema_decay: float = 0.9
    dead_code_threshold: float = 6.0      # restart codes used less than this per batch; 0: never
    gradient: str = "straight-through"    # or "rotation"
    conv_init_scale: float = 0.1          # times the Xavier init, convolutions before BatchNorm
    latent_init_scale: float = 0.5        # times the Xavier-init scale of z_e(x)


ORIGINAL_CONFIG = VQVAEConfig(codebook="loss", codebook_init="uniform", ema_decay=0.99,
                          dead_code_threshold=0.0, conv_init_scale=1.0, latent_init_scale=1.0)


def vqvae_from_config(config):
    """VQVAEConfig -> the VQ-VAE it describes, freshly initialised."""
    return VectorQuantizedVAE(1, config.hidden_size, config.k, codebook=config.codebook,
                              codebook_init=config.codebook_init, decay=config.ema_decay,
                              dead_code_threshold=config.dead_code_threshold,
                              gradient=config.gradient, conv_init_scale=config.conv_init_scale,
                              latent_init_scale=config.latent_init_scale,
                              quantizer=config.quantizer, fsq_levels=tuple(config.fsq_levels))


def original_config_with(**sizes):
    """The original repo's model at the given sizes (its bare state_dicts say none)."""
    return replace(ORIGINAL_CONFIG, **sizes)
