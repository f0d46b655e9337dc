"""How far a set of generated images lies from a reference set. In a judge's features (N, D): the
Frechet distance, the kernel distance (KID, unbiased: it has no small-sample bias to read a floor
through) and improved precision and recall (Kynkaanniemi et al. 2019: the share of samples that
look real, and of real images that the samples cover: lost variety shows as lost recall). And on
the images: a two-sample test, a fresh small classifier trained to tell the two sets apart (its
held-out accuracy: 50% means indistinguishable).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def frechet_distance(a, b):
    """features a (N, D), b (M, D) -> ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in
    float64 (the formula of FID, Heusel et al. 2017; the trace of the square root is the sum of
    the square roots of the eigenvalues of S_a S_b)."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return ((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace()
            - 2 * root_trace).item()


def kernel_distance(a, b, subsets=50, subset_size=1000, seed=0):
    """features a (N, D), b (M, D) -> KID: the unbiased squared MMD under the kernel
    (x.y / D + 1)^3 (Binkowski et al. 2018), averaged over random subsets of both sets (float32,
    as torchmetrics computes it)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = a.float(), b.float()
    m = min(subset_size, len(a), len(b))
    kernel = lambda x, y: (x @ y.t() / a.size(1) + 1) ** 3  # noqa: E731
    estimates = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]
        y = b[torch.randperm(len(b), generator=generator)[:m]]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum())
        estimates.append(within / (m * (m - 1)) - 2 * k_xy.mean())
    return torch.stack(estimates).mean().item()


def _kth_neighbour_radii(x, k):
    """Each row's distance to its k-th nearest other row (its k-NN ball's radius), in row chunks
    of 1,000 so that no (N, N) matrix is held at once."""
    return torch.cat([torch.cdist(part, x).topk(k + 1, largest=False).values[:, -1]
                      for part in x.split(1000)])


def _inside_some_ball(points, centres, radii):
    """points (M, D) -> (M,) bool: within radii (N,) of some row of centres (N, D); chunked."""
    return torch.cat([(torch.cdist(part, centres) <= radii).any(1) for part in points.split(1000)])


def precision_recall(real, fake, k=3):
    """features real (N, D), fake (M, D) -> (precision: the share of fake points inside some real
    point's k-NN ball; recall: the share of real points inside some fake point's k-NN ball)."""
    real, fake = real.float(), fake.float()
    inside_real = _inside_some_ball(fake, real, _kth_neighbour_radii(real, k))
    inside_fake = _inside_some_ball(real, fake, _kth_neighbour_radii(fake, k))
    return inside_real.float().mean().item(), inside_fake.float().mean().item()


class TwoSampleCNN(nn.Module):
    """The two-sample test's classifier, trained anew for every comparison: images (B, 1, 28, 28)
    in [-1, 1] -> one logit, which set an image came from."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, images):
        return self.net(images).squeeze(1)


def two_sample_accuracy(a, b, epochs=3, batch_size=128, seed=0):
    """uint8 images a (N, 1, 28, 28), b (N, 1, 28, 28) -> the held-out accuracy of a fresh
    TwoSampleCNN trained on half of each set to tell them apart (0.5: indistinguishable)."""
    generator = torch.Generator().manual_seed(seed)
    n = min(len(a), len(b))
    images = torch.cat([a[:n], b[:n]]).float().div(127.5).sub(1)
    labels = torch.cat([torch.zeros(n), torch.ones(n)])
    order = torch.randperm(2 * n, generator=generator)
    train, held_out = order[:n], order[n:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TwoSampleCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in train[torch.randperm(n, generator=generator)].split(batch_size):
                loss = F.binary_cross_entropy_with_logits(model(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(images[idx]) > 0 for idx in held_out.split(1000)])
    return (predicted.float() == labels[held_out]).float().mean().item()
