"""The training loop: config -> data and model -> MoCo steps -> metrics and checkpoints.

Resumes by itself when output_dir already holds a checkpoint. The data order of an epoch
and every sample's augmentation are functions of (seed, epoch, index), so a resumed run
continues exactly where the interrupted one was.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from accelerate.utils import set_seed

from .backbones import backbone_plan_from_config
from .checkpoint import (CHECKPOINT_DIR, export_backbone, load_latest, restore_training_state, save_checkpoint,
                         training_state)
from .config import Config, flat_config, save_config
from .data.pipeline import build_pipeline
from .data.sources.registry import build_datasets
from .engine.moco import momentum_at
from .errors import UserError
from .eval.probes import knn_monitor
from .factory import build_model, build_step
from .optim import lr_at
from .plan.auto_batch import AUTO, choose_micro_batch
from .progress import MetricsLog, Progress, peak_memory_mb, trackers
from .run_settings import RunSettings, view_dtype
from .stopping import StopRequests
from .validation import resolve_precision, time_limit_seconds, validate_for_processes


# ------------------------------------------------------------------ set-up helpers


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {path} is not writable ({err.strerror}); "
                        f"choose another with output_dir=...") from None


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `images` (the last partial batch is dropped)."""
    if images < batch_size:
        raise UserError(f"the training set has {images} images, fewer than one batch of {batch_size}; "
                        f"lower train.batch_size or add images")
    return images // batch_size


# ------------------------------------------------------------------ the trainer


class Trainer:
    """One run. __init__: build (data, model, step) then resume; fit(): the loop, saving as it goes."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        cuda = torch.cuda.is_available()
        precision = resolve_precision(cfg.train.precision, torch.cuda.get_device_capability() if cuda else None,
                                      torch.cuda.get_device_name() if cuda else "")
        # No DDP buffer broadcast at each forward: the step merges BatchNorm running statistics
        # itself, to the values one process would hold (moco.merge_bn_stats).
        self.acc = Accelerator(mixed_precision=precision, log_with=trackers(cfg.train.log_with),
                               project_dir=str(self.out),
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.device = self.acc.device
        self.main = self.acc.is_main_process
        world = self.acc.num_processes
        # --- N processes: without a GPU, `accelerate launch --multi_gpu` starts independent runs
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and world == 1:
            raise UserError(f"{launched} processes were launched but accelerate joined none of them for data "
                            f"parallel (no GPU?); on a CPU launch with ACCELERATE_USE_CPU=true accelerate launch "
                            f"--multi_gpu --num_processes {launched} ...")

        # Every check that needs no data, before any data is read or cached.
        self.backbone_plan = backbone_plan_from_config(cfg)  # an unknown model.arch or timm kwarg fails here
        self.found = load_latest(self.out)  # the checkpoint this run resumes from, read once
        resumed_meta = self.found[1] if self.found else None
        micro_batch, how = cfg.micro_batch, None
        if cfg.train.micro_batch_size == AUTO:
            micro_batch, how = choose_micro_batch(cfg, self.device, precision, world, resumed_meta)
        validate_for_processes(cfg, world, micro_batch)
        self.settings = RunSettings(precision, micro_batch, how, view_dtype(cfg, precision, self.device.type), world)
        # From here the run reads a copy with the micro-batch resolved, as config.yaml and the
        # checkpoints record it; the caller's config stays as it was validated.
        self.cfg = cfg = self.settings.recorded_config(cfg)
        if self.main:
            prepare_output_dir(self.out)

        self.data = build_datasets(cfg.data)
        steps_per_epoch(len(self.data.train), cfg.train.batch_size)  # before a cache is built for too few images
        # No labelled test images (data.val_fraction=0 and no test split): nothing to monitor.
        self.knn_every = cfg.eval.knn_every if self.data.val is not None else 0
        if cfg.eval.knn_every and self.data.val is None and self.main:
            warnings.warn("the kNN monitor is off: data.val_fraction=0 and the data has no test split (a val/ "
                          "folder beside train/, data.val_dir, or CIFAR-10's test batch); give one, or set "
                          "data.val_fraction=0.1 to hold out 10% of the training images", stacklevel=2)
        self.resumed_processes: int | None = None
        self.pipeline = build_pipeline(self.data.train, cfg, self.device, self.acc.process_index, world,
                                       self.settings.view_dtype)
        self.steps_per_epoch = steps_per_epoch(len(self.pipeline), cfg.train.batch_size)  # unreadable files left out
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)

        # Seeded right before the model: its initialisation must not depend on what the data
        # step above did (it keeps to private generators, but a data source may not).
        set_seed(cfg.train.seed)
        self.moco = build_model(cfg, self.device, self.backbone_plan)
        self.step_fn = build_step(cfg, self.moco, self.acc, micro_batch)
        self.encoder_q, self.optimizer = self.step_fn.encoder_q, self.step_fn.optimizer
        self.key_shuffle = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.step = 0
        self.counters = {"skipped_steps": 0, "nonfinite_in_a_row": 0, "bad_images": 0,
                         "epoch_loss_sum": 0.0, "epoch_steps": 0}
        self.resumed_from = self._resume()
        self.saved_step = self.step if self.resumed_from else None
        self.stopped: str | None = None  # why fit() stopped early: SIGINT, SIGTERM or time_limit
        if self.main:
            save_config(self.cfg, self.out / "config.yaml")
        self.acc.init_trackers(self.out.name, config=flat_config(self.cfg))

    # -------------------------------------------------------------- resume and save

    def _resume(self) -> Path | None:
        if self.found is None:
            return None
        tensors, meta, path = self.found
        self.found = None  # the tensors are in the model now: do not hold a second copy
        restore_training_state(tensors, meta, path, self.cfg, self.moco, self.optimizer, self.key_shuffle,
                               self.acc.scaler)
        # --- N processes: the effective batch matched, so another number of processes is fine
        if meta.get("processes", 1) != self.acc.num_processes:
            self.resumed_processes = meta.get("processes", 1)
        self.step, self.counters = meta["step"], meta["counters"]
        return path

    def save(self, stop: StopRequests | None = None) -> None:
        if self.saved_step == self.step:  # a stop right after a checkpoint: nothing new to write
            return
        started = time.perf_counter()
        if self.main:
            tensors, meta = training_state(self.moco, self.optimizer, self.key_shuffle, self.acc.scaler,
                                           self.cfg, self.step, self.acc.num_processes, self.counters)
            save_checkpoint(self.out, self.step, tensors, meta, keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        self.saved_step = self.step
        if stop is not None:
            stop.saved(time.perf_counter() - started)

    def _agreed_stop(self, reason: str | None) -> str | None:
        """This process's reason to stop, or, with several processes, the most urgent of any
        process's: they must all stop before the same step (each gets its own signal and clock)."""
        if self.acc.num_processes == 1:
            return reason
        codes = [None, "time_limit", "SIGTERM", "SIGINT"]
        mine = torch.tensor([codes.index(reason)], device=self.device)
        return codes[int(self.acc.gather(mine).max())]

    # -------------------------------------------------------------- evaluation

    def knn(self) -> float:
        """The kNN monitor's top-1 (%) of the held-out images, now (eval/probes.py: knn_monitor)."""
        return knn_monitor(self.moco.encoder_q, self.data, self.cfg, self.device, self.acc.autocast)

    # -------------------------------------------------------------- the loop

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        metrics = MetricsLog(self.out / "metrics.jsonl", self.main, truncate_after=self.step, accelerator=self.acc)
        progress = Progress(self.stop_step, enabled=self.main)
        progress.describe(self._summary())
        if self.step == 0 and self.knn_every:
            metrics.write(epoch=0, step=0, kind="eval", knn_top1=self.knn())
            progress.note(f"kNN top-1 before training: {metrics.last['knn_top1']:.2f}%")
        last = {}
        with progress, StopRequests(time_limit_seconds(t.time_limit)) as stop:
            while self.step < self.stop_step and not self.stopped:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                if start == 0:  # a resumed epoch keeps the loss sums saved with the checkpoint
                    self.counters.update(epoch_loss_sum=0.0, epoch_steps=0, bad_images=0)
                epoch_images, epoch_start = 0, time.perf_counter()
                window_start, window_images = time.perf_counter(), 0
                for view_q, view_k, skipped in self.pipeline.epoch(epoch, start):
                    self.stopped = self._agreed_stop(stop.reason())
                    if self.stopped:  # before the step: the checkpoint below holds every step taken
                        break
                    lr = lr_at(self.step, self.steps_per_epoch, t)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    m = momentum_at(self.step, self.total_steps, cfg.moco.momentum, cfg.moco.momentum_schedule)
                    try:
                        result = self.step_fn(view_q, view_k, m, self.key_shuffle)
                    except torch.cuda.OutOfMemoryError:
                        raise UserError(self._oom_message()) from None
                    self.step += 1
                    self._count(result, skipped)
                    images = t.batch_size
                    self.counters["epoch_loss_sum"] += result.loss
                    self.counters["epoch_steps"] += 1
                    epoch_images += images
                    window_images += images
                    elapsed = time.perf_counter() - window_start
                    last = dict(epoch=epoch + 1, step=self.step, loss=result.loss, lr=lr,
                                images_per_sec=window_images / max(elapsed, 1e-9),
                                peak_mem_mb=peak_memory_mb(self.device))
                    progress.update(last)
                    if self.step % t.log_every == 0:
                        metrics.write(kind="step", momentum=m, skipped_steps=self.counters["skipped_steps"], **last)
                        progress.log_line(last)
                        window_start, window_images = time.perf_counter(), 0
                    stop.step_done()
                    if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                        self.save(stop)
                    if self.step >= self.stop_step:
                        break
                if self.stopped:
                    metrics.write(epoch=epoch + 1, step=self.step, kind="stop", reason=self.stopped)
                    self.save(stop)
                    break
                epoch_done = self.step % self.steps_per_epoch == 0
                record = dict(epoch=epoch + 1, step=self.step, kind="epoch" if epoch_done else "partial_epoch",
                              loss=self.counters["epoch_loss_sum"] / max(1, self.counters["epoch_steps"]),
                              lr=last.get("lr", 0.0),
                              images_per_sec=epoch_images / (time.perf_counter() - epoch_start),
                              peak_mem_mb=peak_memory_mb(self.device), **self.counters_public(),
                              **({"micro_batch_size": self.settings.micro_batch, "micro_batch_auto": True}
                                 if self.settings.micro_batch_how else {}))
                if self.knn_every and ((epoch + 1) % self.knn_every == 0 or self.step >= self.stop_step):
                    record["knn_top1"] = self.knn()
                metrics.write(**record)
                progress.epoch_line(record)
                self.save(stop)
        if self.stopped:
            progress.print(f"stopped before step {self.step + 1} ({self.stopped}); checkpoint step {self.step} is in "
                           f"{self.out / CHECKPOINT_DIR}: run the same command again to resume")
        elif self.main:
            self.export()
        for tracker in self.acc.trackers:  # not acc.end_training(): it also ends the process group
            tracker.finish()
        return metrics.last

    def counters_public(self) -> dict:
        return {"skipped_steps": self.counters["skipped_steps"], "bad_images": self.counters["bad_images"]}

    def _count(self, result, skipped: int) -> None:
        self.counters["bad_images"] += skipped
        if not result.skipped:
            self.counters["nonfinite_in_a_row"] = 0
            return
        self.counters["skipped_steps"] += 1
        self.counters["nonfinite_in_a_row"] += 1
        if self.counters["nonfinite_in_a_row"] >= self.cfg.train.max_nonfinite_steps:
            raise UserError(f"the loss was not finite for {self.counters['nonfinite_in_a_row']} steps in a row "
                            f"(step {self.step}); the last good checkpoint is kept in {self.out}. Lower train.lr, "
                            f"or use train.precision=bf16 (or no) instead of fp16")

    def _oom_message(self) -> str:
        c = self.cfg
        return (f"CUDA ran out of memory at step {self.step + 1} with train.micro_batch_size={c.micro_batch}, "
                f"{c.data.image_size} px, {c.model.arch}. Let the planner pick with train.micro_batch_size=auto, see "
                f"what fits with `lowmem-moco plan RECIPE --budget-gb N`, or reduce memory with train.micro_batch_size={max(2, c.micro_batch // 2)} (the effective batch stays "
                f"{c.train.batch_size}), train.grad_checkpointing=true, train.precision=fp16 or "
                f"moco.key_chunks={min(c.train.batch_size // 2, c.moco.key_chunks * 2)}")

    def export(self) -> Path:
        encoder = self.moco.encoder_q
        return export_backbone(encoder.backbone, encoder.plan, self.out / "backbone.safetensors", self.cfg, self.step)

    def _summary(self) -> str:
        c = self.cfg
        params = sum(p.numel() for p in self.moco.encoder_q.parameters()) / 1e6
        resumed = f", resumed from {self.resumed_from.name} (step {self.step})" if self.resumed_from else ""
        if self.resumed_processes is not None:
            resumed += (f" written by {self.resumed_processes} processes, now {self.acc.num_processes}: the "
                        f"effective batch {c.train.batch_size} is unchanged (moco.key_chunks is per process)")
        per_process = c.accum_steps // self.acc.num_processes
        return (f"MoCo {c.moco.version} {c.model.arch} ({params:.1f}M params) on {self.device}, precision {self.acc.mixed_precision}"
                f"{', backbones compiled (train.compile)' if c.train.compile else ''}"
                f" | batch {c.train.batch_size} = {c.micro_batch} x {per_process} micro-batches"
                f" x {self.acc.num_processes} processes"
                f"{f' (micro-batch auto: {self.settings.micro_batch_how})' if self.settings.micro_batch_how else ''}"
                f", {c.moco.key_chunks} key chunks"
                f"{' per process' if self.acc.num_processes > 1 else ''}"
                f"{', shuffled across processes' if self.acc.num_processes > 1 and c.moco.shuffle_across_processes else ''}"
                f"{f', K {c.moco.queue_size}' if c.moco.version == 'v2' else ', in-batch negatives'}"
                f" | {len(self.data.train)} images, {self.steps_per_epoch} steps/epoch, {c.train.epochs} epochs"
                f" | output {self.out}{resumed}")
