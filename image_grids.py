"""Image grids: for TensorBoard (`image_grid`) and as PNG files (`save_grid`, generate.py's 10x10).

torchvision's make_grid layout (2 black pixels between and around the images), drawn here: importing
torchvision costs each script about 1.5 s of start-up, far more than the grid itself.
"""
import torch
import torch.nn.functional as F
from PIL import Image

from files import atomic_write


def image_grid(images, nrow=8, padding=2):
    """images (B, 1, H, W) in [-1, 1] -> one RGB grid (3, rows (H + p) + p, nrow (W + p) + p) in
    [0, 1], `nrow` images per row (fewer when B is smaller), empty cells black."""
    B, _, H, W = images.shape
    nrow = min(nrow, B)
    rows = -(-B // nrow)
    cells = torch.zeros(rows * nrow, H + padding, W + padding)
    cells[:B, :H, :W] = (images[:, 0].detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = cells.view(rows, nrow, H + padding, W + padding).permute(0, 2, 1, 3) \
        .reshape(rows * (H + padding), nrow * (W + padding))
    return F.pad(grid, (padding, 0, padding, 0)).expand(3, -1, -1)


def save_grid(images, path, nrow=10):
    """images (B, 1, H, W) in [-1, 1] -> a PNG of `nrow` per row at `path`, written atomically
    (another process may be writing the same file)."""
    pixels = image_grid(images, nrow).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    with atomic_write(path) as f:
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(f, format="png")
