"""Large images on a CPU: training at 512 px from photo-sized JPEGs, with the step's peak memory
following the micro-batch and key chunk, not the effective batch."""

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_moco.config import load_config
from lowmem_moco.plan.predict import PlannedStep
from lowmem_moco.plan.memtrack import CountedAsInputs, peak_by_category, step_tracker
from lowmem_moco.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
SIZE = 512
TINY_AT_512 = ["data.source=folder", f"data.image_size={SIZE}", "data.augment=batched", "data.num_workers=0",
               "data.val_fraction=0", "eval.knn_every=0", "model.arch=resnet18",
               "model.timm_kwargs.channels=[8,16,32,64]", "model.dim=16", "moco.queue_size=64",
               "moco.key_chunks=4", "train.micro_batch_size=2", "train.epochs=1", "train.lr=0.01",
               "train.log_every=1", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """32 smooth random JPEGs of 640x544 and 544x640 in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(32):
        height, width = (544, 640) if i % 2 else (640, 544)
        coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        pixels = np.repeat(np.repeat(coarse, 32, axis=0), 32, axis=1)
        path = root / "train" / f"class{i % 2}" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def trainer(photos, tmp_path, batch: int, key_chunks: int = 4) -> Trainer:
    return Trainer(load_config(None, [*TINY_AT_512, f"data.root={photos}", f"data.cache_dir={tmp_path / 'cache'}",
                                      f"output_dir={tmp_path / f'run{batch}'}", f"train.batch_size={batch}",
                                      f"moco.key_chunks={key_chunks}"]))


def step_peak(run: Trainer) -> dict:
    """Bytes by category at the peak of one step on the run's first batch (views included; the
    batch's source photos, in host memory on a GPU, left out)."""
    view_q, view_k, _ = next(iter(run.pipeline.epoch(0, 0)))
    source = view_q.images.pixels
    tracker = step_tracker(lean=True)
    tracker.track_external(run.moco, run.optimizer.optimizer, source)
    with tracker:
        run.step_fn(CountedAsInputs(view_q, tracker), CountedAsInputs(view_k, tracker), 0.99,
                    torch.Generator().manual_seed(1))
    peak = peak_by_category(tracker, "cpu")
    return {**peak, "inputs": peak["inputs"] - source.nbytes, "total": peak["total"] - source.nbytes}


def test_training_at_512_px_runs_from_photo_jpegs(photos, tmp_path):
    last = trainer(photos, tmp_path, batch=8).fit()
    assert last["step"] == 4 and np.isfinite(last["loss"])
    assert (tmp_path / "run8" / "backbone.safetensors").is_file()


@pytest.mark.slow  # two real 512 px steps, one of a batch of 32, and a planner run: 15 s
def test_step_peak_follows_the_micro_batch_not_the_batch(photos, tmp_path):
    view_bytes = 3 * SIZE * SIZE * 4  # one fp32 view of one image
    # Micro-batches of 2 and key chunks of 2 images, in a batch of 8 and in one of 32.
    small = step_peak(trainer(photos, tmp_path, batch=8, key_chunks=4))
    large = step_peak(trainer(photos, tmp_path, batch=32, key_chunks=16))
    # The views alive at the peak: one micro-batch's or one key chunk's, 2 images either way.
    assert small["inputs"] <= 2 * view_bytes and large["inputs"] <= 2 * view_bytes
    # Four times the batch adds its keys (24 more 16-d fp32 rows, a few copies of them), not
    # its views: views of the whole batch would add 2 x 24 images' views (144 MiB).
    assert large["total"] - small["total"] <= 8 * 24 * 16 * 4
    assert large["total"] < 2 * 32 * view_bytes  # less than the large batch's views alone
    # And within 5% of the planner's prediction for micro-batches of 2 (which knows nothing of B's views).
    planned = PlannedStep(trainer(photos, tmp_path, batch=32, key_chunks=16).cfg, "no", False).predict(2)
    assert large["total"] <= 1.05 * planned.peak_bytes
