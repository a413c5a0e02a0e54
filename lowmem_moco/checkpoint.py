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
import os
import re
import warnings
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
FORMAT_VERSION = 1


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of one checkpoint file; CheckpointError if it is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["lowmem_moco"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
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


# ------------------------------------------------------------- exported backbone


def export_backbone(backbone: torch.nn.Module, path: str | Path, cfg, step: int) -> Path:
    """The backbone's weights under timm's own names, plus a JSON of how to rebuild it.

    Loads with timm.create_model(arch, pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=path)); small-image-stem ResNets are rebuilt first
    (see README).
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write_bytes(path, st_save(state, metadata={"format": "pt"}))
    info = {"arch": cfg.model.arch, "timm_kwargs": cfg.model.timm_kwargs, "small_image_stem": cfg.model.small_image_stem,
            "image_size": cfg.data.image_size, "mean": list(cfg.augment.mean), "std": list(cfg.augment.std), "step": step}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path
