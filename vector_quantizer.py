"""Vector quantisation for the VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation
Learning", section 3.1).

Shapes, with B images, a (H, W) = (7, 7) latent grid, D = --hidden-size and K = --k codes:

    z_e_x      (B, D, H, W)   encoder output
    flat       (B*H*W, D)     one row per latent position
    distances  (B*H*W, K)     squared L2 from each row to each codeword
    indices    (B, H, W)      argmin over K, int64
    z_q_x      (B, D, H, W)   codewords gathered by index

`vq` and `vq_st` are the original repo's functional API (kept so code and tests written against it work);
`VQEmbedding` is the module the model uses, with the codebook options as constructor arguments.

Beside it, three other quantizers behind the same interface (`Quantizer`: `quantize` -> `Quantized`,
`codewords(indices)`, `K`), chosen by `VQ-VAE.py --quantizer`:
    fsq    FiniteScalarQuantizer, implicit grid codebook (Mentzer et al. 2023)
    lfq    LookupFreeQuantizer, signs of log2 K channels (Yu et al. 2023, MAGVIT-v2)
    simvq  SimVQ, a frozen random codebook times one learned linear map (Zhu et al. 2024)
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

QUANTIZERS = ("vq", "fsq", "lfq", "simvq")
FSQ_LEVELS = (8, 8, 8)       # FSQ's default: K = 512, every level >= 5 as the paper advises
FSQ_MAX_LEVEL = 1000         # the bound's (1 + eps) margin would reach a further integer past this
MAX_IMPLICIT_K = 2 ** 16     # FSQ's and LFQ's K: per-batch code counts (K,), LFQ's (N, K) entropy terms
CODEBOOKS = ("loss", "ema")
CODEBOOK_INITS = ("uniform", "kmeans")
GRADIENTS = ("straight-through", "rotation")


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def count_codes(indices, K):
    """indices (any shape) int64 -> how often each code occurs (K,) float32. A scatter-add, not
    torch.bincount: bincount's output size depends on the data, so on CUDA it waits for the values
    (a host sync in every training step)."""
    flat = indices.reshape(-1)
    return torch.zeros(K, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def vq(inputs, codebook):
    """Nearest codeword for every row: inputs (..., D), codebook (K, D) -> indices (...) int64.

    ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, so the (N, K) distances come from one matrix product and
    no (N, K, D) tensor is ever built. Always float32: bf16 distances mis-assign near-ties.
    """
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
        flat = inputs.reshape(-1, codebook.size(1)).float()              # (..., D) -> (N, D)
        codebook = codebook.float()
        distances = torch.addmm((codebook * codebook).sum(1) + (flat * flat).sum(1, keepdim=True),
                                flat, codebook.t(), alpha=-2.0)          # (N, K)
        return distances.argmin(1).view(inputs.shape[:-1])


class VectorQuantizationStraightThrough(torch.autograd.Function):
    """Forward: nearest codewords. Backward: the straight-through estimator (section 3.1) copies the
    gradient of the codes onto the inputs unchanged, and gives the codebook exactly the gradient of
    `torch.embedding(codebook, indices)`."""

    @staticmethod
    def forward(ctx, inputs, codebook):
        indices = vq(inputs, codebook).flatten()                          # (N,)
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        ctx.codebook_shape = codebook.shape
        codes = codebook.index_select(0, indices).view_as(inputs)        # (N, D) -> (..., D)
        return codes, indices

    @staticmethod
    def backward(ctx, grad_codes, grad_indices):
        indices, = ctx.saved_tensors
        grad_inputs = grad_codes.clone() if ctx.needs_input_grad[0] else None
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            grad_codebook = grad_codes.new_zeros(ctx.codebook_shape).index_add_(
                0, indices, grad_codes.reshape(-1, ctx.codebook_shape[1]))
        return grad_inputs, grad_codebook


def vq_st(inputs, codebook):
    """inputs (..., D), codebook (K, D) -> codes (..., D) with straight-through gradients, indices (N,)."""
    return VectorQuantizationStraightThrough.apply(inputs, codebook)


def rotate_to_codes(inputs, codes, eps=1e-6):
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
    Trick", eq. 4): inputs (N, D), codes (N, D) -> (N, D) equal to `codes` in the forward pass, whose
    gradient reaches `inputs` through sg[lambda R], the rotation-and-rescaling that carries each input
    onto its codeword, instead of through the identity (straight-through).

    R e = e - 2 r (r.e) + 2 q^ (e^.e) with e^ = e/|e|, q^ = q/|q|, r = (e^ + q^)/|e^ + q^|, and
    lambda = |q|/|e|; R, lambda and the codes carry no gradient.
    """
    with torch.no_grad():
        e_norm = inputs.norm(dim=1, keepdim=True).clamp(min=eps)          # (N, 1)
        q_norm = codes.norm(dim=1, keepdim=True).clamp(min=eps)
        e_hat, q_hat = inputs / e_norm, codes / q_norm                    # (N, D)
        r = e_hat + q_hat
        r = r / r.norm(dim=1, keepdim=True).clamp(min=eps)
        scale = q_norm / e_norm
    rotated = scale * (inputs - 2 * r * (r * inputs).sum(1, keepdim=True)
                       + 2 * q_hat * (e_hat * inputs).sum(1, keepdim=True))
    # Forward value exactly the codeword (R is degenerate when e^ = -q^); gradient that of `rotated`.
    return codes + (rotated - rotated.detach())


class Quantized(NamedTuple):
    """What every quantizer's `quantize` returns for z_e_x (B, D, H, W)."""
    codes: torch.Tensor      # (B, D, H, W) the decoder's input: the values of codewords(indices),
                             # with a gradient path to z_e_x (straight-through or its variants)
    z_q_x: torch.Tensor      # (B, D, H, W) the same values, with the gradient of the learned
                             # codebook if there is one (the original's name)
    indices: torch.Tensor    # (B, H, W) int64 in [0, K)
    error: torch.Tensor      # mean squared distance between what is quantized and its code, in
                             # the quantizer's own space (logged as loss/*/quantization)
    losses: dict             # name -> unweighted auxiliary loss the trainer adds (scalar, float32)


def with_straight_through_gradient(inputs, quantized):
    """`quantized` in the forward pass, exactly (x + (q - x).detach() can be off by a rounding);
    the gradient goes to `inputs` unchanged (van den Oord et al. 2017, section 3.1)."""
    return _StraightThrough.apply(inputs, quantized)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, quantized):
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def channels_last(z):
    """(B, C, H, W) -> (B, H, W, C) float32, contiguous: the quantizers' arithmetic stays float32
    under --amp (bf16 rounds distances and grid levels)."""
    return z.permute(0, 2, 3, 1).float().contiguous()


def channels_first(z):
    """(B, H, W, C) -> (B, C, H, W), always a copy: the decoder's in-place ReLU needs its own
    (with C = 1 the permuted view is already contiguous, and .contiguous() would not copy)."""
    return z.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def fsq_levels_problem(levels):
    """What makes FSQ levels unusable, or None: the script's flag errors and the class share it."""
    if not levels or min(levels) < 2 or max(levels) > FSQ_MAX_LEVEL or \
            math.prod(levels) > MAX_IMPLICIT_K:
        return f"expected levels from 2 to {FSQ_MAX_LEVEL} whose product (K) is at most {MAX_IMPLICIT_K}"
    return None


def lfq_k_problem(K):
    """What makes K unusable for LFQ, or None."""
    if K < 2 or K & (K - 1) or K > MAX_IMPLICIT_K:
        return f"LFQ needs a power of two from 2 to {MAX_IMPLICIT_K} (each code is log2 K bits)"
    return None


class Quantizer(nn.Module):
    """The interface of every quantizer: K codes, `forward` (indices, the original's API),
    `straight_through` (the original's API), `quantize` (-> Quantized) and `codewords`
    (indices -> what the decoder gets). `loss_names`: the keys of `Quantized.losses`."""
    K: int
    loss_names: tuple = ()

    def forward(self, z_e_x):
        """(B, D, H, W) -> code indices (B, H, W)."""
        return self.quantize(z_e_x).indices

    def straight_through(self, z_e_x):
        """The original's API: (B, D, H, W) -> (z_q_x_st, z_q_x), both (B, D, H, W)."""
        quantized = self.quantize(z_e_x)
        return quantized.codes, quantized.z_q_x

    def quantize(self, z_e_x):
        raise NotImplementedError

    def codewords(self, indices):
        """(B, H, W) int64 -> (B, D, H, W), exactly the `codes` those indices were quantized to."""
        raise NotImplementedError


def kmeans(samples, k, iterations=10):
    """A few vectorised Lloyd iterations: samples (N, D) -> centroids (k, D), float32.

    Starts from k distinct samples (drawn with replacement when N < k); an empty cluster keeps its
    previous centroid, so no division by zero.
    """
    samples = samples.float()
    n = samples.size(0)
    start = torch.randperm(n, device=samples.device)[:k] if n >= k else \
        torch.randint(n, (k,), device=samples.device)
    centroids = samples[start].clone()
    for _ in range(iterations):
        assign = vq(samples, centroids)                                   # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        counts = count_codes(assign, k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class VQEmbedding(Quantizer):
    """Codebook of K codewords of size D, with the original's `forward` (indices) and `straight_through`.

    codebook='loss'  the original's: codewords are parameters moved by the codebook loss ||sg[z_e] - e||^2.
    codebook='ema'   codewords are exponential moving averages of the encoder outputs assigned to them
                     (paper appendix A.1; Laplace-smoothed counts as in Sonnet); no codebook loss.
    init='kmeans'    on the first training batch the codebook is set by k-means on encoder outputs.
    dead_code_threshold > 0: a code whose EMA usage (assignments per batch) falls below it is re-seeded
                     with a random encoder output of the current batch.
    gradient='rotation': the decoder's gradient reaches the encoder through `rotate_to_codes`
                     instead of the straight-through copy (the original's).
    """

    def __init__(self, K, D, codebook="loss", init="uniform", decay=0.99, dead_code_threshold=0.0,
                 eps=1e-5, gradient="straight-through"):
        super().__init__()
        if codebook not in CODEBOOKS or init not in CODEBOOK_INITS or gradient not in GRADIENTS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, init one of {CODEBOOK_INITS} "
                             f"and gradient one of {GRADIENTS}")
        self.K, self.D = K, D
        self.loss_names = ("commitment", "codebook") if codebook == "loss" else ("commitment",)
        self.codebook, self.init, self.decay, self.gradient = codebook, init, decay, gradient
        self.dead_code_threshold, self.eps = dead_code_threshold, eps
        self.embedding = nn.Embedding(K, D)
        self.embedding.weight.data.uniform_(-1.0 / K, 1.0 / K)
        if codebook == "ema":
            self.embedding.weight.requires_grad_(False)
        # EMA of assignments per batch: drives dead-code restart, and is the EMA count in 'ema' mode.
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_avg", self.embedding.weight.detach().clone())
        self.register_buffer("initialized", torch.tensor(init != "kmeans"))
        # Python mirror of `initialized`, so the training step never reads a device flag.
        self._needs_init = init == "kmeans"
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "_needs_init", not bool(module.initialized)))

    def forward(self, z_e_x):
        """(B, D, H, W) -> code indices (B, H, W)."""
        return vq(z_e_x.permute(0, 2, 3, 1), self.embedding.weight)

    def codewords(self, indices):
        return channels_first(self.embedding(indices))                   # (B, H, W, D) -> (B, D, H, W)

    def quantize(self, z_e_x):
        """(B, D, H, W) -> Quantized, with losses 'commitment' ||z_e - sg[e]||^2 and, in 'loss'
        mode, 'codebook' ||sg[z_e] - e||^2 (paper eq. 3). Updates the codebook in training mode."""
        with torch.autocast(z_e_x.device.type, enabled=False):
            z_e_x_ = channels_last(z_e_x)                                # (B, H, W, D)
            if self.training and self._needs_init:
                self._kmeans_init(z_e_x_.detach().reshape(-1, self.D))
            z_q_x_, indices = vq_st(z_e_x_, self.embedding.weight.detach())  # (B, H, W, D), (B*H*W,)
            if self.gradient == "rotation":
                z_q_x_ = rotate_to_codes(z_e_x_.reshape(-1, self.D),
                                         z_q_x_.detach().reshape(-1, self.D)).view_as(z_e_x_)
            codewords = self.embedding.weight.index_select(0, indices).view_as(z_e_x_)
            codebook = F.mse_loss(codewords, z_e_x_.detach())
            losses = {"commitment": F.mse_loss(z_e_x_, codewords.detach())}
            if self.codebook == "loss":
                losses["codebook"] = codebook
            if self.training:
                self._update_codebook(z_e_x_.detach().reshape(-1, self.D), indices)
            return Quantized(channels_first(z_q_x_), codewords.permute(0, 3, 1, 2),
                             indices.view(z_e_x_.shape[:-1]), codebook.detach(), losses)

    @torch.no_grad()
    def _kmeans_init(self, flat):
        centroids = kmeans(flat, self.K)
        if _distributed():
            dist.broadcast(centroids, 0)
        self.embedding.weight.data.copy_(centroids)
        self.embed_avg.copy_(centroids)
        self.initialized.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _update_codebook(self, flat, indices):
        """flat (N, D) encoder outputs of this batch and their codes (N,); statistics in float32.
        Writes go through `.data` so tensors autograd saved this step keep their version."""
        flat = flat.float()
        counts = count_codes(indices, self.K)                             # (K,)
        if self.codebook == "ema":
            embed_sum = torch.zeros_like(self.embed_avg).index_add_(0, indices, flat)  # (K, D)
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(embed_sum)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
            self.embedding.weight.data.copy_(self.embed_avg / smoothed.unsqueeze(1))
        else:
            if _distributed():
                dist.all_reduce(counts)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat):
        # torch.where instead of `if dead.any()` keeps the step free of host syncs.
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)   # (K, 1)
        replacements = flat[torch.randint(flat.size(0), (self.K,), device=flat.device)]
        # A re-seeded code starts at the mean usage (at least the threshold), not at a count of 1:
        # its EMA count then takes ~log(mean / threshold) / (1 - decay) steps to fall below the
        # threshold, a grace period to win inputs (from 1, a threshold above 1 re-seeded it every step).
        grace = (self.cluster_size.sum() / self.K).clamp(min=self.dead_code_threshold)
        weight = self.embedding.weight.data
        weight.copy_(torch.where(dead, replacements, weight))
        self.embed_avg.copy_(torch.where(dead, replacements * grace, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), grace, self.cluster_size))
        if _distributed():
            for tensor in (weight, self.embed_avg, self.cluster_size):
                dist.broadcast(tensor, 0)


class FiniteScalarQuantizer(Quantizer):
    """FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple", section 3): a 1x1
    conv takes z_e_x to d = len(levels) channels; channel i is bounded to L_i levels and rounded
    (straight-through); a 1x1 conv takes the grid point back to D channels for the decoder. The
    codebook is implicit, the K = prod(L_i) points of the grid: no codebook and no commitment loss.

    Shapes: z_e_x (B, D, H, W) -> z (B, H, W, d) -> grid point (B, H, W, d) with channel i in
    {-L_i//2, ..., (L_i-1)//2} / (L_i//2) -> codes (B, D, H, W); index = sum_i level_i * prod_{j<i} L_j.
    """

    def __init__(self, D, levels):
        super().__init__()
        if problem := fsq_levels_problem(levels):
            raise ValueError(f"FSQ levels {list(levels)}: {problem}")
        self.K, self.D, self.levels = math.prod(levels), D, tuple(levels)
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0),
                             persistent=False)
        self.project_in = nn.Conv2d(D, len(levels), 1)
        self.project_out = nn.Conv2d(len(levels), D, 1)

    def bound(self, z, eps=1e-3):
        """(..., d) -> (..., d), channel i in an interval holding exactly L_i integers: an odd L
        gives (-(L-1)/2, (L-1)/2), an even L the same shifted by 1/2 (the paper's appendix A.1)."""
        half = (self._levels - 1) * (1 + eps) / 2
        offset = (self._levels % 2 == 0) * 0.5
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def grid(self, indices):
        """(...) int64 -> the grid points (..., d) those indices name."""
        level = indices.unsqueeze(-1) // self._basis % self._levels             # (..., d) in [0, L_i)
        half_width = self._levels // 2
        return (level - half_width).float() / half_width

    def codewords(self, indices):
        with torch.autocast(indices.device.type, enabled=False):
            return self.project_out(channels_first(self.grid(indices)))

    def quantize(self, z_e_x):
        with torch.autocast(z_e_x.device.type, enabled=False):
            bounded = self.bound(channels_last(self.project_in(z_e_x.float())))  # (B, H, W, d)
            rounded = bounded.round()
            half_width = self._levels // 2
            indices = ((rounded + half_width).long() * self._basis).sum(-1)     # (B, H, W)
            point = with_straight_through_gradient(bounded, rounded) / half_width
            codes = self.project_out(channels_first(point))
            error = F.mse_loss(bounded.detach() / half_width, point.detach())
            return Quantized(codes, codes.detach(), indices, error, {})


class LookupFreeQuantizer(Quantizer):
    """LFQ (Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation",
    section 3.1): a 1x1 conv takes z_e_x to b = log2 K channels, each quantized to its sign
    (straight-through), the index is the bits; a 1x1 conv takes the code back to D channels.

    Shapes: z_e_x (B, D, H, W) -> z (B, H, W, b) -> q = sign(z) in {-1, 1}^b -> codes (B, D, H, W);
    index = sum_i [q_i > 0] 2^i.

    losses: 'commitment' ||z - sg[q]||^2 and 'entropy', the paper's eq. 5: the mean per-position
    entropy of the assignment distribution minus the entropy of its batch mean, with
    p(code c | z) = softmax_c(-||z - c||^2 / temperature) over all K codes (temperature 0.01 as in
    lucidrains/vector-quantize-pytorch). It lies in
    [-log K, 0]: -log K for confident assignments spread evenly over the codes, 0 when every
    position has the same distribution (a collapsed batch). Under torchrun the batch mean is each
    process's own batch (the ranks stay identical, but the term depends on the per-process batch).
    """

    def __init__(self, K, D, temperature=0.01):
        super().__init__()
        if problem := lfq_k_problem(K):
            raise ValueError(f"LFQ with K = {K}: {problem}")
        bits = round(math.log2(K))
        self.K, self.D, self.bits, self.temperature = K, D, bits, temperature
        self.loss_names = ("commitment", "entropy")
        self.register_buffer("_powers", 2 ** torch.arange(bits), persistent=False)
        self.project_in = nn.Conv2d(D, bits, 1)
        self.project_out = nn.Conv2d(bits, D, 1)

    def signs(self, indices):
        """(...) int64 -> (..., b) in {-1, 1}."""
        return (indices.unsqueeze(-1) // self._powers % 2).float() * 2 - 1

    def codewords(self, indices):
        with torch.autocast(indices.device.type, enabled=False):
            return self.project_out(channels_first(self.signs(indices)))

    def entropy_loss(self, z):
        """z (N, b) -> mean_n H(p(.|z_n)) - H(mean_n p(.|z_n)), in nats.

        -||z - c||^2 / temperature is a sum over the bits, so p(.|z) is a product of independent
        bits, bit i being +1 with probability sigmoid(x_i), x = 4 z / temperature: the per-position
        entropy is a sum of b binary entropies, and log p(c|z) = sum_i logsigmoid(-x_i) + x . [c > 0]
        (one (N, b) x (b, K) product)."""
        x = 4 * z / self.temperature                                            # (N, b)
        per_position = (F.softplus(x) - x * torch.sigmoid(x)).sum(1).mean()
        ones = (self.signs(torch.arange(self.K, device=z.device)) > 0).float()  # (K, b)
        log_p = F.logsigmoid(-x).sum(1, keepdim=True) + x @ ones.t()            # (N, K)
        # log mean_n p(c|z_n), a logsumexp over positions; terms below e^-80 of the largest are
        # dropped, since exp() of them gives denormals, which run ~30x slower on x86 CPUs.
        top = log_p.detach().amax(0)                                            # (K,)
        log_mean_p = top + torch.log((log_p - top).clamp(min=-80).exp().mean(0))
        return per_position + (log_mean_p.exp() * log_mean_p).sum()

    def quantize(self, z_e_x):
        with torch.autocast(z_e_x.device.type, enabled=False):
            z = channels_last(self.project_in(z_e_x.float()))                 # (B, H, W, b)
            q = torch.where(z > 0, 1.0, -1.0)
            indices = ((q > 0).long() * self._powers).sum(-1)                  # (B, H, W)
            codes = self.project_out(channels_first(with_straight_through_gradient(z, q)))
            commitment = F.mse_loss(z, q)
            losses = {"commitment": commitment}
            if self.training:  # the (B*H*W, K) entropy term is for training only
                losses["entropy"] = self.entropy_loss(z.reshape(-1, self.bits))
            return Quantized(codes, codes.detach(), indices, commitment.detach(), losses)


class SimVQ(Quantizer):
    """SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with
    One Linear Layer", eq. 6): the codebook is C W, a frozen random C (K, D), drawn N(0, 1/D) as in
    the paper's code, times one learned linear map W (D -> D). The nearest codeword over C W is
    taken with the straight-through gradient; the codebook loss ||sg[z_e] - e||^2 trains W, so one
    gradient step moves every codeword, used or not (no EMA, no restarts).

    Shapes: z_e_x (B, D, H, W) -> flat (B*H*W, D); base C (K, D) -> codebook map(C) (K, D);
    indices (B, H, W); codes (B, D, H, W). losses 'codebook' and 'commitment', as VQ's 'loss' mode.
    """

    def __init__(self, K, D):
        super().__init__()
        self.K, self.D = K, D
        self.loss_names = ("commitment", "codebook")
        self.register_buffer("base", torch.randn(K, D) * D ** -0.5)           # C, never trained
        self.map = nn.Linear(D, D)                                            # W

    def codebook(self):
        """The effective codebook (K, D), with the gradient of the map."""
        return self.map(self.base)

    def codewords(self, indices):
        with torch.autocast(indices.device.type, enabled=False):
            return channels_first(F.embedding(indices, self.codebook()))

    def quantize(self, z_e_x):
        with torch.autocast(z_e_x.device.type, enabled=False):
            z = channels_last(z_e_x)                                           # (B, H, W, D)
            codebook = self.codebook()
            indices = vq(z, codebook)                                          # (B, H, W)
            codewords = F.embedding(indices, codebook)                         # (B, H, W, D)
            codes = channels_first(with_straight_through_gradient(z, codewords.detach()))
            error = F.mse_loss(codewords, z.detach())
            losses = {"commitment": F.mse_loss(z, codewords.detach()), "codebook": error}
            return Quantized(codes, codewords.permute(0, 3, 1, 2), indices, error.detach(), losses)


def make_quantizer(quantizer, K, D, fsq_levels=FSQ_LEVELS, **vq_options):
    """The quantizer of `VQ-VAE.py --quantizer`: 'vq' takes the codebook options of VQEmbedding;
    'fsq' has K = prod(fsq_levels); 'lfq' needs K a power of two."""
    if quantizer == "vq":
        return VQEmbedding(K, D, **vq_options)
    if quantizer == "fsq":
        if math.prod(fsq_levels) != K:
            raise ValueError(f"FSQ levels {list(fsq_levels)} give K = {math.prod(fsq_levels)}, not {K}")
        return FiniteScalarQuantizer(D, fsq_levels)
    if quantizer == "lfq":
        return LookupFreeQuantizer(K, D)
    if quantizer == "simvq":
        return SimVQ(K, D)
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
