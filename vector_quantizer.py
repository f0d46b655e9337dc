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
"""
import torch
import torch.distributed as dist
import torch.nn as nn

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


class VQEmbedding(nn.Module):
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

    def straight_through(self, z_e_x):
        """The original's API: (B, D, H, W) -> (z_q_x_st, z_q_x), both (B, D, H, W)."""
        z_q_x_st, z_q_x, _ = self.quantize(z_e_x)
        return z_q_x_st, z_q_x

    def quantize(self, z_e_x):
        """(B, D, H, W) -> z_q_x_st (decoder input, gradient flows to z_e_x), z_q_x (gradient flows to
        the codebook in 'loss' mode), indices (B, H, W). Updates the codebook in training mode."""
        z_e_x_ = z_e_x.permute(0, 2, 3, 1).contiguous()                  # (B, H, W, D)
        if self.training and self._needs_init:
            self._kmeans_init(z_e_x_.detach().reshape(-1, self.D))
        z_q_x_, indices = vq_st(z_e_x_, self.embedding.weight.detach())  # (B, H, W, D), (B*H*W,)
        if self.gradient == "rotation":
            z_q_x_ = rotate_to_codes(z_e_x_.reshape(-1, self.D),
                                     z_q_x_.detach().reshape(-1, self.D)).view_as(z_e_x_)
        z_q_x_st = z_q_x_.permute(0, 3, 1, 2).contiguous()  # the decoder's in-place ReLU needs a copy
        z_q_x = self.embedding.weight.index_select(0, indices).view_as(z_e_x_).permute(0, 3, 1, 2)
        if self.training:
            self._update_codebook(z_e_x_.detach().reshape(-1, self.D), indices)
        return z_q_x_st, z_q_x, indices.view(z_e_x_.shape[:-1])

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
