"""The training loop: config -> data and model -> MoCo steps -> metrics and checkpoints.

Resumes by itself when output_dir already holds a checkpoint. The data order of an epoch
and every sample's augmentation are functions of (seed, epoch, index), so a resumed run
continues exactly where the interrupted one was.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from accelerate.utils import set_seed

from .backbones import backbone_plan_from_config, encoder_from_config, enable_grad_checkpointing
from .checkpoint import export_backbone, join_state, load_latest, save_checkpoint, split_state
from .config import Config, TrainConfig, config_from_dict, flat_config, save_config
from .data.augment import eval_transform
from .data.datasets import EvalImages, build_datasets
from .errors import CheckpointError, ConfigError, UserError
from .eval.probes import extract_features, knn_accuracy
from .engine.moco import MoCo, momentum_at
from .data.pipeline import build_pipeline
from .progress import MetricsLog, Progress, trackers
from .engine.step import MoCoStep


# ------------------------------------------------------------------ schedule


def lr_at(step: int, steps_per_epoch: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step`: linear warm-up, then cosine decay to zero.

    `cosine` decays every step. The official code sets the rate once per epoch, to
    lr * (1 + cos(pi * e / E)) / 2 for epoch e of E: main_moco.py counts e from 0
    (`cosine_epoch_start`), the CIFAR-10 notebook from 1 (`cosine_epoch_end`).
    """
    total_steps, warmup_steps = steps_per_epoch * t.epochs, round(t.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return t.lr * (step + 1) / warmup_steps
    if t.lr_schedule != "cosine":
        epoch = step // steps_per_epoch + (t.lr_schedule == "cosine_epoch_end")
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ set-up helpers


def resolve_precision(requested: str) -> str:
    if requested == "bf16" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise ConfigError(f"train.precision=bf16 is emulated (slow) on {torch.cuda.get_device_name()} "
                              f"(compute capability {major}.{minor} < 8.0); use train.precision=fp16")
    if requested == "fp16" and not torch.cuda.is_available():
        warnings.warn("train.precision=fp16 needs a CUDA GPU for speed and loss scaling; running in fp32 "
                      "(use train.precision=bf16 for mixed precision on a CPU)", stacklevel=2)
        return "no"
    return requested


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {path} is not writable ({err.strerror}); "
                        f"choose another with output_dir=...") from None


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def check_compatible(saved: Config, cfg: Config, path: Path) -> None:
    """A checkpoint resumes only into the same model; other changes are allowed.

    The backbone is compared by the arguments timm builds it with, not by the keys that led
    there: model.resnet_init only changes the initial weights, which a resumed run replaces.
    """
    fields = ["model.arch", "model.small_image_stem", "model.dim", "model.head", "model.head_hidden_dim",
              "moco.queue_size"]
    for name in fields:
        section, key = name.split(".")
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            raise CheckpointError(f"{path} was trained with {name}={old!r} but the config says {new!r}; "
                                  f"use the same {name} to resume, or a new output_dir to start afresh")
    # Other keys can build the same backbone (an old run's timm_kwargs.zero_init_last: false is today's
    # resnet_init: torchvision), and the same keys another one (a ViT sized by data.image_size).
    old, new = backbone_plan_from_config(saved).timm_kwargs, backbone_plan_from_config(cfg).timm_kwargs
    if old != new:
        raise CheckpointError(f"{path} holds a {cfg.model.arch} built with {old} but this config builds it with "
                              f"{new}; resume with the run's data.image_size and model settings, or a new output_dir")


# ------------------------------------------------------------------ the trainer


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        precision = resolve_precision(cfg.train.precision)
        # No DDP buffer broadcast at each forward: the step merges BatchNorm running statistics
        # itself, to the values one process would hold (moco.merge_bn_stats).
        self.acc = Accelerator(mixed_precision=precision, log_with=trackers(cfg.train.log_with),
                               project_dir=str(self.out),
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.device = self.acc.device
        self.main = self.acc.is_main_process
        self.auto_micro_batch = None  # how train.micro_batch_size=auto was resolved, if it was
        if cfg.train.micro_batch_size == "auto":
            from .plan.auto_batch import choose_micro_batch
            cfg.train.micro_batch_size, self.auto_micro_batch = choose_micro_batch(
                cfg, self.device, precision, self.acc.num_processes)
        # --- N processes: without a GPU, `accelerate launch --multi_gpu` starts independent runs
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.acc.num_processes == 1:
            raise UserError(f"{launched} processes were launched but accelerate joined none of them for data "
                            f"parallel (no GPU?); on a CPU launch with ACCELERATE_USE_CPU=true accelerate launch "
                            f"--multi_gpu --num_processes {launched} ...")
        if self.main:
            prepare_output_dir(self.out)

        backbone_plan_from_config(cfg)  # an unknown model.arch or timm kwarg fails before any data work
        self.data = build_datasets(cfg.data)
        # No labelled test images (data.val_fraction=0 and no test split): nothing to monitor.
        self.knn_every = cfg.eval.knn_every if self.data.val is not None else 0
        if cfg.eval.knn_every and self.data.val is None and self.main:
            warnings.warn("the kNN monitor is off: data.val_fraction=0 and the data has no test split (a val/ "
                          "folder beside train/, data.val_dir, or CIFAR-10's test batch); give one, or set "
                          "data.val_fraction=0.1 to hold out 10% of the training images", stacklevel=2)
        world = self.acc.num_processes
        if cfg.train.batch_size % (world * cfg.micro_batch):
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must split into {world} processes x "
                              f"micro-batches of {cfg.micro_batch}; change train.micro_batch_size")
        # --- N processes: moco.key_chunks counts chunks of each process's share of the keys
        share = cfg.train.batch_size // world
        if world > 1 and (share % cfg.moco.key_chunks or share // cfg.moco.key_chunks < 2):
            raise ConfigError(f"moco.key_chunks ({cfg.moco.key_chunks}) counts chunks per process and must split "
                              f"each process's {share} keys into equal chunks of at least 2; "
                              f"e.g. moco.key_chunks={max(1, share // cfg.micro_batch)}")
        self.resumed_processes: int | None = None
        view_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.pipeline = build_pipeline(self.data.train, cfg, self.device, self.acc.process_index, world,
                                       view_dtype if self.device.type == "cuda" else torch.float32)
        self.steps_per_epoch = len(self.pipeline) // cfg.train.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the training set has {len(self.pipeline)} images, fewer than one batch of "
                            f"{cfg.train.batch_size}; lower train.batch_size or add images")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)

        m = cfg.model
        # Seeded right before the model: its initialisation must not depend on whether the data
        # step above had work to do (a cache build draws random numbers, a cache hit does not).
        set_seed(cfg.train.seed)
        encoder = encoder_from_config(cfg)
        if cfg.train.grad_checkpointing:
            enable_grad_checkpointing(encoder.backbone, m.arch)
        self.moco = MoCo(encoder, cfg.moco.queue_size, m.dim).to(self.device)
        if cfg.train.channels_last:
            self.moco.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(self.moco.encoder_q.parameters(), cfg)
        self.encoder_q, self.optimizer = self.acc.prepare(self.moco.encoder_q, optimizer)
        self.key_shuffle = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.step_fn = MoCoStep(self.moco, self.optimizer, self.acc, micro_batch=cfg.micro_batch,
                                key_chunks=cfg.moco.key_chunks, temperature=cfg.moco.temperature,
                                symmetric=cfg.moco.symmetric, encoder_q=self.encoder_q,
                                guard_bn_stats=cfg.train.grad_checkpointing,
                                shuffle_across_processes=cfg.moco.shuffle_across_processes)
        self.step = 0
        self.counters = {"skipped_steps": 0, "nonfinite_in_a_row": 0, "bad_images": 0,
                         "epoch_loss_sum": 0.0, "epoch_steps": 0}
        self.resumed_from = self._resume()
        if self.main:
            save_config(cfg, self.out / "config.yaml")
        self.acc.init_trackers(self.out.name, config=flat_config(cfg))

    # -------------------------------------------------------------- state

    def _state(self) -> tuple[dict, dict]:
        tensors = {f"model.{k}": v for k, v in self.moco.state_dict().items()}
        opt_tensors, opt_rest = split_state(self.optimizer.state_dict(), "optimizer")
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.key_shuffle"] = self.key_shuffle.get_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        np_state = np.random.get_state()
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
        meta = {
            "step": self.step, "config": self.cfg.to_dict(), "optimizer": opt_rest, "scaler": scaler,
            "processes": self.acc.num_processes,
            "counters": self.counters, "rng_python": list(random.getstate()[1]),
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        return tensors, meta

    def _resume(self) -> Path | None:
        found = load_latest(self.out)
        if found is None:
            return None
        tensors, meta, path = found
        check_compatible(config_from_dict(meta["config"]), self.cfg, path)
        saved_batch = meta["config"]["train"]["batch_size"]
        if saved_batch != self.cfg.train.batch_size:
            raise CheckpointError(f"{path} was trained with train.batch_size={saved_batch}; resuming with "
                                  f"{self.cfg.train.batch_size} would change the data order and schedule. "
                                  f"Use train.batch_size={saved_batch} (the micro-batch and the number of "
                                  f"processes may change)")
        # --- N processes: the effective batch matched, so another number of processes is fine
        if meta.get("processes", 1) != self.acc.num_processes:
            self.resumed_processes = meta.get("processes", 1)
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.moco.load_state_dict(model)
        self.optimizer.load_state_dict(join_state(tensors, meta["optimizer"]))
        if meta["scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.key_shuffle.set_state(tensors["rng.key_shuffle"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        random.setstate((3, tuple(meta["rng_python"]), None))
        n = meta["rng_numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
        self.step = meta["step"]
        self.counters = meta["counters"]
        return path

    def save(self) -> None:
        if self.main:
            tensors, meta = self._state()
            save_checkpoint(self.out, self.step, tensors, meta, keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    # -------------------------------------------------------------- evaluation

    def knn(self) -> float:
        """Weighted kNN top-1 of the held-out images against a bank of training images (eval views).

        eval.knn_features picks the backbone's pooled features or the head's output (the official
        CIFAR-10 notebook's monitor); eval.knn_max_train caps the bank (0: every training image).
        """
        cfg = self.cfg
        train = self.data.train
        bank_size = min(len(train), cfg.eval.knn_max_train or len(train))
        if bank_size < len(train):  # a fixed random subset: the same bank at every evaluation
            train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:bank_size].tolist())
        encoder = self.moco.encoder_q
        model = encoder if cfg.eval.knn_features == "head" else encoder.backbone
        (bank, bank_y), (val, val_y) = [
            extract_features(model, self._eval_loader(images), self.device, autocast=self.acc.autocast,
                             channels_last=cfg.train.channels_last) for images in (train, self.data.val)]
        bank, bank_y, val = bank.to(self.device), bank_y.to(self.device), val.to(self.device)
        return knn_accuracy(bank, bank_y, val, val_y.to(self.device), len(self.data.classes),
                            k=cfg.eval.knn_k, t=cfg.eval.knn_t)["top1"]

    def _eval_loader(self, images):
        cfg = self.cfg
        view = eval_transform(cfg.data.image_size, cfg.augment.mean, cfg.augment.std)
        return torch.utils.data.DataLoader(EvalImages(images, cfg.data.image_size, cfg.data.on_bad_image, view),
                                           batch_size=max(64, self.cfg.micro_batch),
                                           num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator())  # leaves the global RNG alone

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
        with progress:
            while self.step < self.stop_step:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                if start == 0:  # a resumed epoch keeps the loss sums saved with the checkpoint
                    self.counters.update(epoch_loss_sum=0.0, epoch_steps=0)
                epoch_images, epoch_start = 0, time.perf_counter()
                window_start, window_images = time.perf_counter(), 0
                for view_q, view_k, skipped in self.pipeline.epoch(epoch, start):
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
                    if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.stop_step:
                        break
                epoch_done = self.step % self.steps_per_epoch == 0
                record = dict(epoch=epoch + 1, step=self.step, kind="epoch" if epoch_done else "partial_epoch",
                              loss=self.counters["epoch_loss_sum"] / max(1, self.counters["epoch_steps"]),
                              lr=last.get("lr", 0.0),
                              images_per_sec=epoch_images / (time.perf_counter() - epoch_start),
                              peak_mem_mb=peak_memory_mb(self.device), **self.counters_public(),
                              **({"micro_batch_size": cfg.micro_batch, "micro_batch_auto": True}
                                 if self.auto_micro_batch else {}))
                if self.knn_every and ((epoch + 1) % self.knn_every == 0 or self.step >= self.stop_step):
                    record["knn_top1"] = self.knn()
                metrics.write(**record)
                progress.epoch_line(record)
                self.save()
        if self.main:
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
        return export_backbone(self.moco.encoder_q.backbone, self.out / "backbone.safetensors", self.cfg, self.step)

    def _summary(self) -> str:
        c = self.cfg
        params = sum(p.numel() for p in self.moco.encoder_q.parameters()) / 1e6
        resumed = f", resumed from {self.resumed_from.name} (step {self.step})" if self.resumed_from else ""
        if self.resumed_processes is not None:
            resumed += (f" written by {self.resumed_processes} processes, now {self.acc.num_processes}: the "
                        f"effective batch {c.train.batch_size} is unchanged (moco.key_chunks is per process)")
        per_process = c.accum_steps // self.acc.num_processes
        return (f"MoCo v2 {c.model.arch} ({params:.1f}M params) on {self.device}, precision {self.acc.mixed_precision}"
                f" | batch {c.train.batch_size} = {c.micro_batch} x {per_process} micro-batches"
                f" x {self.acc.num_processes} processes"
                f"{f' (micro-batch auto: {self.auto_micro_batch})' if self.auto_micro_batch else ''}"
                f", {c.moco.key_chunks} key chunks"
                f"{' per process' if self.acc.num_processes > 1 else ''}"
                f"{', shuffled across processes' if self.acc.num_processes > 1 and c.moco.shuffle_across_processes else ''}"
                f", K {c.moco.queue_size}"
                f" | {len(self.data.train)} images, {self.steps_per_epoch} steps/epoch, {c.train.epochs} epochs"
                f" | output {self.out}{resumed}")


def train(cfg: Config) -> dict:
    return Trainer(cfg).fit()
