"""The networks: the VQ-VAE (encoder, codebook, decoder), the judge classifiers, and the builder of
either prior from its config (`prior_from_config`).

Model shapes (B images, D = --hidden-size, K = --k):
    x (B, 1, 28, 28) in [-1, 1] -> encoder -> z_e_x (B, D, 7, 7) -> codebook -> indices (B, 7, 7)
    -> z_q_x (B, D, 7, 7) -> decoder -> x_tilde (B, 1, 28, 28) in [-1, 1]

The codebook itself (lookup, straight-through gradient, EMA update, restarts) is in
vector_quantizer.py; the priors over codes in gated_pixelcnn.py and code_transformer.py.
"""


import torch
import torch.nn as nn

from code_transformer import CodeTransformer
from gated_pixelcnn import GatedPixelCNN
from vector_quantizer import VQEmbedding


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
    """The seed's network: 28x28 -> 7x7 by two 4x4 stride-2 convs and two residual blocks, mirrored
    in the decoder, which ends in Tanh. Codebook options are passed on to `VQEmbedding`."""

    def __init__(self, input_dim, dim, K=512, codebook="loss", codebook_init="uniform", decay=0.99,
                 dead_code_threshold=0.0, gradient="straight-through", conv_init_scale=1.0,
                 latent_init_scale=1.0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, dim, 4, 2, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.Conv2d(dim, dim, 4, 2, 1),
            ResBlock(dim),
            ResBlock(dim),
        )
        self.codeBook = VQEmbedding(K, dim, codebook, codebook_init, decay, dead_code_threshold,
                                    gradient=gradient)
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
        """Multiply parts of the seed's Xavier init (1, 1: the seed's init). In training mode the
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
        z_q_x = self.codeBook.embedding(latents).permute(0, 3, 1, 2)     # (B, 7, 7, D) -> (B, D, 7, 7)
        return self.decoder(z_q_x)

    def forward(self, x, return_indices=False):
        """-> (x_tilde, z_e_x, z_q_x) as in the seed, plus indices (B, 7, 7) when asked."""
        z_e_x = self.encoder(x)
        z_q_x_st, z_q_x, indices = self.codeBook.quantize(z_e_x)
        x_tilde = self.decoder(z_q_x_st)
        return (x_tilde, z_e_x, z_q_x, indices) if return_indices else (x_tilde, z_e_x, z_q_x)


# The training defaults (VQ-VAE.py's flags), chosen by the ablation in README.md. The seed repo's
# configuration is {"codebook": "loss", "codebook_init": "uniform", "dead_code_threshold": 0.0,
# "lr_schedule": "constant", "conv_init_scale": 1.0, "latent_init_scale": 1.0}.
DEFAULT_CONFIG = {"hidden_size": 40, "k": 512, "codebook": "ema", "codebook_init": "kmeans",
                  "ema_decay": 0.9, "dead_code_threshold": 6.0, "lr_schedule": "cosine",
                  "gradient": "straight-through", "conv_init_scale": 0.1, "latent_init_scale": 0.5}


def vqvae_from_config(config):
    """Build the VQ-VAE a checkpoint's `config` describes (seed defaults for missing options)."""
    return VectorQuantizedVAE(1, config["hidden_size"], config["k"],
                              codebook=config.get("codebook", "loss"),
                              codebook_init=config.get("codebook_init", "uniform"),
                              decay=config.get("ema_decay", 0.99),
                              dead_code_threshold=config.get("dead_code_threshold", 0.0),
                              gradient=config.get("gradient", "straight-through"),
                              conv_init_scale=config.get("conv_init_scale", 1.0),
                              latent_init_scale=config.get("latent_init_scale", 1.0))


class MNISTClassifier(nn.Module):
    """Small CNN judge of generated digits (classifier.py --arch cnn): images (B, 1, 28, 28) in
    [-1, 1] -> logits (B, 10); `features` gives the 128-d penultimate activations used for
    Frechet distances."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 3 * 3, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


class MNISTMLPClassifier(nn.Module):
    """The second judge (classifier.py --arch mlp): a multilayer perceptron on the raw pixels, with
    no convolution, so that it errs differently from the CNN. images (B, 1, 28, 28) -> logits
    (B, 10); `features`: 128-d penultimate activations."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(512, self.num_features), nn.BatchNorm1d(self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


CLASSIFIERS = {"cnn": MNISTClassifier, "mlp": MNISTMLPClassifier}


PRIORS = ("gated_pixelcnn", "transformer")


def prior_from_config(config):
    """Build the prior a pixelcnn_prior.py config describes (a Gated PixelCNN where it names no
    arch, as the first priors did)."""
    unconditional = config.get("label_dropout", 0) > 0
    if config.get("arch", "gated_pixelcnn") == "transformer":
        return CodeTransformer(config["k"], config["hidden_size"], config["num_layers"],
                               config["heads"], dropout=config["dropout"],
                               unconditional=unconditional)
    return GatedPixelCNN(config["k"], config["hidden_size"], config["num_layers"],
                         dropout=config.get("dropout", 0.0), unconditional=unconditional)
