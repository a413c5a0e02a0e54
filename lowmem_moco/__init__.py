"""lowmem-moco: memory-efficient MoCo v2 on one GPU.

    import lowmem_moco
    run_dir = lowmem_moco.train("recipes/demo.yaml", {"train.epochs": 1})
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def train(recipe: str | Path | None, overrides: dict | None = None) -> Path:
    """Train from a recipe in this process, as `lowmem-moco train` does; returns the run's folder.

    `overrides` maps dotted keys to values, e.g. {"train.epochs": 1, "data.root": "/content/data"}.
    The run resumes when its output_dir holds a checkpoint, and stops safely (checkpoint saved) on
    an interrupt or at train.time_limit; the Accelerator is created inside, so this also runs
    under accelerate.notebook_launcher.
    """
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(recipe, overrides or {})
    Trainer(cfg).fit()
    return Path(cfg.output_dir)
