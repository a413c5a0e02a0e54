"""Every check of a run configuration's values, in one place.

    validate(cfg)                                  at load (config.load_config): each key, each combination
    validate_for_processes(cfg, world, micro)      at start-up, once accelerate knows the processes
    resolve_precision(requested, capability, gpu)  at start-up, once the device is known

Each raises `ConfigError` with one line naming the key and the fix. What only the data can
tell (fewer images than one batch, an unreadable folder) is checked where the data is read
(data/, trainer.py), and what needs timm (an unknown model.arch or timm kwarg) in backbones.py
and timm_args.py, run before any data work.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from .errors import ConfigError
from .schema import ALIASES, AUGMENT_LISTS, CHOICES, PER_VIEW, AugmentConfig, Config, MocoConfig


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. get_key(cfg, "train.precision")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _in_range(key: str, value: float, low: float, high: float, what: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} must be {what}; got {value}")


def validate_augment(a: AugmentConfig) -> None:
    """One line per out-of-range augmentation parameter, naming the key and its valid range."""
    for name, length in AUGMENT_LISTS.items():
        if len(getattr(a, name)) != length:
            raise ConfigError(f"augment.{name} must hold {length} numbers; got {getattr(a, name)}")
    (s_lo, s_hi), (r_lo, r_hi), (g_lo, g_hi) = a.crop_scale, a.crop_ratio, a.blur_sigma
    if not 0.0 < s_lo <= s_hi <= 1.0:
        raise ConfigError(f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1; got {a.crop_scale}")
    if not 0.0 < r_lo <= r_hi:
        raise ConfigError(f"augment.crop_ratio must be [low, high] with 0 < low <= high; got {a.crop_ratio}")
    if not 0.0 < g_lo <= g_hi:
        raise ConfigError(f"augment.blur_sigma must be [low, high] with 0 < low <= high; got {a.blur_sigma}")
    for name in PER_VIEW:
        value = getattr(a, name)
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ConfigError(f"augment.{name} must be one probability (both views) or two, [view 1, view 2]; "
                              f"got {len(value)} values {value}; e.g. augment.{name}=[{value[0] if value else 0.5}, "
                              f"{value[-1] if value else 0.5}]")
        for view, probability in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            where = f" (view {view + 1})" if isinstance(value, (list, tuple)) else ""
            _in_range(f"augment.{name}{where}", probability, 0.0, 1.0, "a probability in [0, 1]")
    for name, value in zip(("brightness", "contrast", "saturation"), a.jitter[:3]):
        _in_range(f"augment.jitter ({name})", value, 0.0, float("inf"), ">= 0")
    _in_range("augment.jitter (hue)", a.jitter[3], 0.0, 0.5, "in [0, 0.5]")
    if a.blur_max_radius < 0:
        raise ConfigError(f"augment.blur_max_radius must be >= 0 (0: no cap); got {a.blur_max_radius}")
    if min(a.std) <= 0:
        raise ConfigError(f"augment.std must be positive; got {a.std}")


def validate(cfg: Config) -> None:
    d, m, mo, t = cfg.data, cfg.model, cfg.moco, cfg.train
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            extra = ALIASES.get(key, {})
            spelled = [str(v) for v in choices] + [v for v in extra if isinstance(v, str)]
            raise ConfigError(f"{key} must be one of {', '.join(spelled)}; got {value!r}")
    validate_augment(cfg.augment)
    if d.augment == "per_image" and d.cache != "auto":
        raise ConfigError(f"data.cache={d.cache} applies to data.augment=batched only; set that, or data.cache=auto")
    positive = {
        "data.image_size": d.image_size, "model.dim": m.dim, "moco.queue_size": mo.queue_size,
        "moco.temperature": mo.temperature, "moco.key_chunks": mo.key_chunks,
        "train.batch_size": t.batch_size, "train.epochs": t.epochs, "train.lr": t.lr,
        "train.keep_checkpoints": t.keep_checkpoints, "train.log_every": t.log_every,
        "data.synthetic_size": d.synthetic_size, "data.synthetic_classes": d.synthetic_classes,
        "eval.knn_k": cfg.eval.knn_k, "eval.knn_t": cfg.eval.knn_t,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive; got {value}")
    if not 0.0 <= mo.momentum < 1.0:
        raise ConfigError(f"moco.momentum must be in [0, 1); got {mo.momentum} (MoCo v2 uses 0.999, CIFAR 0.99)")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1) (0: train on every image); got {d.val_fraction}")
    if cfg.eval.knn_max_train < 0:
        raise ConfigError(f"eval.knn_max_train must be >= 0 (0: the whole training set); got {cfg.eval.knn_max_train}")
    auto = t.micro_batch_size == "auto"
    if t.micro_batch_size is not None and not auto and t.micro_batch_size <= 0:
        raise ConfigError(f"train.micro_batch_size must be positive or auto; got {t.micro_batch_size}")

    batch, micro = t.batch_size, t.batch_size if auto else cfg.micro_batch
    if micro > batch:
        raise ConfigError(f"train.micro_batch_size ({micro}) is larger than train.batch_size ({batch}); "
                          f"lower it to at most {batch}")
    if batch % micro:
        divisors = [k for k in range(1, batch + 1) if batch % k == 0 and k <= micro]
        raise ConfigError(f"train.batch_size ({batch}) is not a multiple of train.micro_batch_size ({micro}); "
                          f"use a micro-batch that divides it, e.g. train.micro_batch_size={divisors[-1]}")
    if micro < 2:
        raise ConfigError("train.micro_batch_size must be at least 2: BatchNorm needs two samples per batch")
    if mo.key_chunks > batch:
        raise ConfigError(f"moco.key_chunks ({mo.key_chunks}) is more than the {batch} keys of a batch; "
                          f"use at most train.batch_size // 2 chunks (e.g. moco.key_chunks={max(1, batch // 32)})")
    if batch % mo.key_chunks or batch // mo.key_chunks < 2:
        raise ConfigError(f"moco.key_chunks ({mo.key_chunks}) must split train.batch_size ({batch}) into equal "
                          f"chunks of at least 2 keys; e.g. moco.key_chunks={max(1, batch // max(micro, 2))}")
    if mo.version == "v3":
        validate_v3(cfg)
    elif mo.queue_size < (keys_per_step := batch * (2 if mo.symmetric else 1)):
        raise ConfigError(f"moco.queue_size ({mo.queue_size}) is smaller than the {keys_per_step} keys enqueued "
                          f"per step; raise it to at least {keys_per_step}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive or null; got {t.max_steps}")
    time_limit_seconds(t.time_limit)
    if t.checkpoint_every < 0 or cfg.eval.knn_every < 0:
        raise ConfigError("train.checkpoint_every and eval.knn_every must be >= 0 (0 turns them off)")


def validate_v3(cfg: Config) -> None:
    """moco.version=v3: the keys that only v2 reads, refused where a value would be misread."""
    if cfg.model.head != "mlp":
        raise ConfigError(f"model.head={cfg.model.head} is MoCo v2's choice; moco.version=v3 always builds MoCo v3's "
                          f"projector and predictor: remove model.head (or set moco.version=v2)")
    if cfg.moco.symmetric:
        raise ConfigError("moco.symmetric is MoCo v2's option; moco.version=v3's loss is always symmetric: "
                          "remove moco.symmetric (or set it to false)")
    if cfg.moco.queue_size != MocoConfig.queue_size:
        warnings.warn(f"moco.queue_size={cfg.moco.queue_size} is unused: moco.version=v3 has no queue "
                      f"(its negatives are the batch's keys)", stacklevel=3)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def time_limit_seconds(text: str | None) -> float | None:
    """train.time_limit in seconds: hours, minutes and seconds in that order, e.g. 11h30m, 170m,
    40s, 1.5h; None for no limit."""
    if text is None:
        return None
    found = _DURATION.fullmatch(str(text).strip().lower())
    if not found or not any(found.groups()):
        raise ConfigError(f"train.time_limit={text!r} is not a duration; write it like 11h30m, 170m or 40s")
    hours, minutes, seconds = (float(g or 0) for g in found.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"train.time_limit={text!r} must be longer than zero; e.g. train.time_limit=11h30m")
    return total


def validate_for_processes(cfg: Config, world: int, micro: int | None = None) -> None:
    """The checks that need the number of processes (`world`), known once accelerate has started;
    `micro`: the micro-batch the run trains with (what train.micro_batch_size=auto became)."""
    batch, chunks = cfg.train.batch_size, cfg.moco.key_chunks
    micro = micro or cfg.micro_batch
    if cfg.moco.version == "v3" and world > 1:
        raise ConfigError(f"moco.version=v3 runs on one process (its gradient cache makes any batch fit one "
                          f"device); this run has {world}: launch it without accelerate's multi-process "
                          f"launcher, or set moco.version=v2")
    if batch % (world * micro):
        raise ConfigError(f"train.batch_size ({batch}) must split into {world} processes x "
                          f"micro-batches of {micro}; change train.micro_batch_size")
    # --- N processes: moco.key_chunks counts chunks of each process's share of the keys
    share = batch // world
    if world > 1 and (share % chunks or share // chunks < 2):
        raise ConfigError(f"moco.key_chunks ({chunks}) counts chunks per process and must split "
                          f"each process's {share} keys into equal chunks of at least 2; "
                          f"e.g. moco.key_chunks={max(1, share // micro)}")


def resolve_precision(requested: str, cuda_capability: tuple[int, int] | None, gpu_name: str = "") -> str:
    """accelerate's mixed_precision for train.precision on this device: `cuda_capability` is the
    GPU's (major, minor), None without a CUDA GPU."""
    if requested == "bf16" and cuda_capability is not None:
        major, minor = cuda_capability
        if major < 8:
            raise ConfigError(f"train.precision=bf16 is emulated (slow) on {gpu_name} "
                              f"(compute capability {major}.{minor} < 8.0); use train.precision=fp16")
    if requested == "fp16" and cuda_capability is None:
        warnings.warn("train.precision=fp16 needs a CUDA GPU for speed and loss scaling; running in fp32 "
                      "(use train.precision=bf16 for mixed precision on a CPU)", stacklevel=2)
        return "no"
    return requested
