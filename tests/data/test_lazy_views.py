"""Views made on demand (data/lazy_views.py, engine/views.py): the same training as views made
for the whole batch before the step, bit for bit, with input memory that follows the chunk."""

import pytest
import torch
from accelerate import Accelerator

from lowmem_moco.config import Config, validate
from lowmem_moco.data.lazy_views import BatchedView
from lowmem_moco.data.pipeline import build_pipeline
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.engine.views import whole
from lowmem_moco.factory import build_model, build_step

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
CPU = torch.device("cpu")


def small_run(mode: str, tmp_path, symmetric: bool = False) -> Config:
    cfg = Config()
    d = cfg.data
    d.source, d.synthetic_size, d.image_size, d.augment, d.num_workers = "synthetic", 64, 24, mode, 0
    d.download, d.cache_dir = False, str(tmp_path / "cache")
    cfg.model.arch, cfg.model.timm_kwargs = "resnet18", {"channels": [8, 16, 32, 64]}
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.channels_last = 16, 4, True
    cfg.moco.key_chunks, cfg.moco.queue_size, cfg.moco.symmetric = 4, 32, symmetric
    validate(cfg)
    return cfg


def whole_batch(view_q, view_k):
    """Both views of the whole batch made before the step, as the pipeline did before lazy views."""
    if isinstance(view_q, BatchedView):  # one augmentation pass over both views of every image
        q, k = view_q.augment.two_views(view_q.images, view_q.seeds, view_q.dtype, normalize=True)
    else:
        q, k = view_q.views, view_k.views
    return q.contiguous(memory_format=view_q.memory_format), k.contiguous(memory_format=view_k.memory_format)


def train(cfg: Config, steps: int, lazy: bool):
    pipeline = build_pipeline(build_datasets(cfg.data).train, cfg, CPU)
    torch.manual_seed(cfg.train.seed)
    moco = build_model(cfg, CPU)
    step = build_step(cfg, moco, Accelerator(cpu=True))
    shuffle, losses = torch.Generator().manual_seed(1), []
    for _, (view_q, view_k, _) in zip(range(steps), pipeline.epoch(0, 0)):
        if not lazy:
            view_q, view_k = whole_batch(view_q, view_k)
        losses.append(step(view_q, view_k, 0.99, shuffle).loss)
    return losses, moco.state_dict()


@pytest.mark.parametrize("mode,symmetric", [("batched", False), ("per_image", False), ("batched", True)])
def test_lazy_views_train_exactly_as_whole_batch_views(mode, symmetric, tmp_path):
    cfg = small_run(mode, tmp_path, symmetric)
    lazy_losses, lazy_state = train(cfg, 3, lazy=True)
    whole_losses, whole_state = train(cfg, 3, lazy=False)
    assert lazy_losses == whole_losses
    assert lazy_state.keys() == whole_state.keys()
    for name, value in lazy_state.items():  # both encoders, BatchNorm statistics, the queue
        assert torch.equal(value, whole_state[name]), name


def test_each_view_is_made_one_chunk_at_a_time(tmp_path):
    """The step never asks for more rows than a micro-batch or a key chunk: that bounds input memory."""
    cfg = small_run("batched", tmp_path)
    pipeline = build_pipeline(build_datasets(cfg.data).train, cfg, CPU)
    requested = []

    class Recording(BatchedView):
        def __call__(self, rows):
            requested.append((self.number, len(rows)))
            return super().__call__(rows)

    view_q, view_k, _ = next(iter(pipeline.epoch(0, 0)))
    view_q.__class__ = view_k.__class__ = Recording
    torch.manual_seed(0)
    moco = build_model(cfg, CPU)
    build_step(cfg, moco, Accelerator(cpu=True))(view_q, view_k, 0.99, torch.Generator().manual_seed(1))
    chunk = cfg.train.batch_size // cfg.moco.key_chunks
    # All keys first (chunk by chunk), then the queries (micro-batch by micro-batch).
    assert requested == [(1, chunk)] * cfg.moco.key_chunks + [(0, cfg.micro_batch)] * cfg.accum_steps


def test_any_rows_of_a_lazy_view_equal_those_rows_of_the_whole_view(tmp_path):
    cfg = small_run("batched", tmp_path)
    view_q, view_k, _ = next(iter(build_pipeline(build_datasets(cfg.data).train, cfg, CPU).epoch(0, 0)))
    q, k = whole_batch(view_q, view_k)
    rows = torch.tensor([5, 0, 11, 5])
    assert torch.equal(view_q(rows), q[rows]) and torch.equal(view_k(rows), k[rows])
    assert torch.equal(whole(view_k), k) and view_k(rows).is_contiguous(memory_format=torch.channels_last)
