"""Pipeline.preview: the views training makes for chosen samples, unnormalised."""

import pytest
import torch

from lowmem_moco.config import Config, validate
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.data.pipeline import EpochBatches, build_pipeline
from lowmem_moco.engine.views import whole


def pipeline_for(mode, tmp_path, **augment):
    cfg = Config()
    d = cfg.data
    d.source, d.synthetic_size, d.image_size, d.augment, d.num_workers = "synthetic", 24, 16, mode, 0
    d.download, d.cache_dir = False, str(tmp_path / "cache")
    cfg.train.batch_size, cfg.train.seed, cfg.moco.key_chunks = 8, 5, 1
    for key, value in augment.items():
        setattr(cfg.augment, key, value)
    validate(cfg)
    return cfg, build_pipeline(build_datasets(d).train, cfg, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["batched", "per_image"])
def test_preview_is_what_the_epoch_yields(mode, tmp_path):
    cfg, pipeline = pipeline_for(mode, tmp_path, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    epoch = 1
    first_batch = [i for i, _ in next(iter(EpochBatches(len(pipeline), 8, cfg.train.seed, epoch)))]
    view_q, view_k = (whole(view) for view in next(iter(pipeline.epoch(epoch, 0)))[:2])
    preview_q, preview_k = pipeline.preview(first_batch, epoch)
    assert preview_q.shape == (8, 3, 16, 16) and 0 <= preview_q.min() and preview_q.max() <= 1
    mean, std = torch.tensor(cfg.augment.mean).view(1, 3, 1, 1), torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    assert torch.allclose((preview_q - mean) / std, view_q, atol=1e-5)
    assert torch.allclose((preview_k - mean) / std, view_k, atol=1e-5)
    assert not torch.allclose(pipeline.preview(first_batch, epoch + 1)[0], preview_q)  # a new epoch, new views
