"""`lowmem-moco views`: the two training views of the first N images, as a picture and a tensor.

The views come from the pipeline training would build for the same config (per-image or
batched, the same `augment:` section, the same per-sample seeds of epoch 0), so what the
picture shows is what the encoder is trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ..config import Config
from .sources.registry import build_datasets
from ..errors import UserError
from .pipeline import BatchedPipeline, build_pipeline

MIN_TILE = 96  # px: small views (32-px CIFAR) are enlarged, without smoothing, to be seen


def training_views(cfg: Config, n: int, device: torch.device | None = None) -> tuple[torch.Tensor, str]:
    """(uint8 (N, 2, 3, S, S) query and key views before normalisation, the path that made them)."""
    if n < 1:
        raise UserError(f"--n must be at least 1; got {n}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = build_datasets(cfg.data).train
    if n > len(train):
        raise UserError(f"--n {n} is more than the {len(train)} training images; use --n {len(train)} or fewer")
    pipeline = build_pipeline(train, cfg, device)
    view_q, view_k = pipeline.preview(list(range(n)), epoch=0)  # float (N, 3, S, S) in [0, 1]
    views = torch.stack([view_q, view_k], dim=1)  # (N, 2, 3, S, S)
    path = "batched path (decoded cache)" if isinstance(pipeline, BatchedPipeline) else "per-image path"
    return views.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu(), path


def save_views(cfg: Config, n: int, out: str | Path, tensor_out: str | Path | None = None) -> str:
    """Write the grid (each row: query view, key view, for 4 images) and optionally the uint8 tensor."""
    views, path = training_views(cfg, n)
    tiles = views.flatten(0, 1).float() / 255  # (2N, 3, S, S): q0, k0, q1, k1, ...
    size = tiles.shape[-1]
    if size < MIN_TILE:
        tiles = F.interpolate(tiles, scale_factor=-(-MIN_TILE // size), mode="nearest")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=min(8, 2 * n), padding=4, pad_value=1.0), out)
    written = [str(out)]
    if tensor_out is not None:
        Path(tensor_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(views, tensor_out)
        written.append(f"{tensor_out} (uint8 {tuple(views.shape)})")
    return f"{n} images x 2 views at {size} px from the {path}: {', '.join(written)}"
