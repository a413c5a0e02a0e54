"""Checkpoints that survive a disconnect at any moment, and the exported backbone.

A checkpoint is one safetensors file: every tensor (models, queue, optimizer state, RNG
states) plus a JSON document in the header metadata for the rest (step, config, scalar
optimizer and scaler state) and a CRC of the tensor bytes. It is written under a temporary
name, fsynced and renamed, so a file with the final name is always complete; a file that
is truncated or damaged anyway fails its header or CRC check and the previous one is used.
No pickle is ever loaded.
"""

from __future__ import annotations

import json
import random
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .backbones import backbone_plan_from_config
from .timm_args import BackbonePlan
from .config import Config, config_from_dict
from .errors import CheckpointError
from .files import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
# 2: the backbone's plan (timm arguments, stem) is stored as meta['backbone']; 1 had only the config.
FORMAT_VERSION = 2


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc


def save_checkpoint(output_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    folder = Path(output_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, crc32=_crc(tensors))
    path = folder / f"step-{step:09d}.safetensors"
    atomic_write_bytes(path, st_save(tensors, metadata={"lowmem_moco": json.dumps(meta)}))
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


_UNREADABLE = (OSError, SafetensorError, ValueError, KeyError, TypeError)


def read_meta(path: str | Path) -> dict:
    """The JSON meta of one checkpoint file, from its header alone; CheckpointError if unreadable."""
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["lowmem_moco"])
    except _UNREADABLE as err:
        raise CheckpointError(f"{path} is damaged or not a lowmem-moco checkpoint ({err})") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of one checkpoint file; CheckpointError if it is damaged."""
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = st_load(path.read_bytes())
    except _UNREADABLE as err:
        raise CheckpointError(f"{path} is damaged or not a lowmem-moco checkpoint ({err})") from None
    if meta.get("crc32") != _crc(tensors):
        raise CheckpointError(f"{path} is damaged: its data does not match its checksum")
    return tensors, meta


def load_latest(output_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path] | None:
    """The newest intact checkpoint, falling back (with a warning) past damaged ones."""
    paths = list_checkpoints(output_dir)
    for path in reversed(paths):
        try:
            tensors, meta = read_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
            continue
        return tensors, meta, path
    if paths:
        raise CheckpointError(f"every checkpoint in {Path(output_dir) / CHECKPOINT_DIR} is damaged; "
                              f"remove that folder to start afresh or point output_dir elsewhere")
    return None


# ------------------------------------------------------------- optimizer state <-> tensors


def split_state(state: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state dict into flat tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                 for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        return node

    return tensors, walk(state, prefix)


def join_state(tensors: dict[str, torch.Tensor], skeleton):
    """Inverse of split_state."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {join_state(tensors, k): join_state(tensors, v) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [join_state(tensors, v) for v in skeleton["__list__"]]
    return skeleton


# ------------------------------------------------------------- a training run's state


def saved_backbone(meta: dict) -> BackbonePlan:
    """How the saved run built its backbone: stored since format 2; worked out from its config
    for a format-1 checkpoint (what the run then built)."""
    if "backbone" in meta:
        return BackbonePlan.from_dict(meta["backbone"])
    return backbone_plan_from_config(config_from_dict(meta["config"]))


def check_compatible(meta: dict, cfg: Config, plan: BackbonePlan, path: Path) -> None:
    """A checkpoint resumes only into the same model; other changes are allowed.

    The backbone is compared by the arguments timm builds it with (`plan`, the run's own), not
    by the keys that led there: model.resnet_init only changes the initial weights, which a
    resumed run replaces.
    """
    saved = config_from_dict(meta["config"])
    fields = ["moco.version", "model.arch", "model.small_image_stem", "model.dim", "model.head",
              "model.head_hidden_dim", "moco.queue_size"]
    for name in fields:
        section, key = name.split(".")
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            raise CheckpointError(f"{path} was trained with {name}={old!r} but the config says {new!r}; "
                                  f"use the same {name} to resume, or a new output_dir to start afresh")
    # Other keys can build the same backbone (an old run's timm_kwargs.zero_init_last: false is today's
    # resnet_init: torchvision), and the same keys another one (a ViT sized by data.image_size).
    # The ViT options change no shape, but which weights train: compared with the arguments.
    old, new = ({**p.to_dict()["timm_kwargs"], **p.vit_options()} for p in (saved_backbone(meta), plan))
    if old != new:
        raise CheckpointError(f"{path} holds a {cfg.model.arch} built with {old} but this config builds it with "
                              f"{new}; resume with the run's data.image_size and model settings, or a new output_dir")


def model_state(tensors: dict[str, torch.Tensor], part: str = "") -> dict[str, torch.Tensor]:
    """The state dict of the saved MoCo model (`part=""`) or of one of its modules (e.g.
    "encoder_q"), from a checkpoint's tensors: the one place their "model." prefix is read."""
    prefix = f"model.{part}." if part else "model."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def training_state(moco, optimizer, key_shuffle: torch.Generator, scaler, cfg, step: int, processes: int,
                   counters: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a run needs to continue exactly: (tensors, JSON-able meta) for save_checkpoint."""
    tensors = {f"model.{k}": v for k, v in moco.state_dict().items()}
    opt_tensors, opt_rest = split_state(optimizer.state_dict(), "optimizer")
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.key_shuffle"] = key_shuffle.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "step": step, "config": cfg.to_dict(), "backbone": moco.encoder_q.plan.to_dict(), "optimizer": opt_rest,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "processes": processes,
        "counters": counters, "rng_python": list(random.getstate()[1]),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_training_state(tensors: dict[str, torch.Tensor], meta: dict, path: Path, cfg, moco, optimizer,
                           key_shuffle: torch.Generator, scaler) -> None:
    """Inverse of training_state, after checking that `cfg` may resume the run saved in `path`."""
    check_compatible(meta, cfg, moco.encoder_q.plan, path)
    saved_batch = meta["config"]["train"]["batch_size"]
    if saved_batch != cfg.train.batch_size:
        raise CheckpointError(f"{path} was trained with train.batch_size={saved_batch}; resuming with "
                              f"{cfg.train.batch_size} would change the data order and schedule. "
                              f"Use train.batch_size={saved_batch} (the micro-batch and the number of "
                              f"processes may change)")
    moco.load_state_dict(model_state(tensors))
    optimizer.load_state_dict(join_state(tensors, meta["optimizer"]))
    if meta["scaler"] is not None and scaler is not None:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    key_shuffle.set_state(tensors["rng.key_shuffle"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate((3, tuple(meta["rng_python"]), None))
    n = meta["rng_numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


# ------------------------------------------------------------- exported backbone


def export_backbone(backbone: torch.nn.Module, plan: BackbonePlan, path: str | Path, cfg, step: int) -> Path:
    """The backbone's weights under timm's own names, plus a JSON of how to rebuild it.

    backbone.json's timm_kwargs are `plan`'s: exactly the arguments the backbone was built with
    (after filtering and stem adaptation), so timm.create_model(arch, num_classes=0, **timm_kwargs,
    pretrained=True, pretrained_cfg_overlay=dict(file=path)) reloads it; when
    rebuild_small_image_stem is true (a small-image ResNet) use
    lowmem_moco.backbones.load_exported_backbone(path) instead (see README).
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write_bytes(path, st_save(state, metadata={"format": "pt"}))
    info = {**plan.to_dict(), "small_image_stem": cfg.model.small_image_stem, "image_size": cfg.data.image_size,
            "mean": list(cfg.augment.mean), "std": list(cfg.augment.std), "step": step}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path
