"""The run configuration's schema: every key, its type and its default, as dataclasses.

Loading a recipe, overrides and validation live in config.py, which re-exports these names.
Defaults are MoCo v2's unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Union

DATA_SOURCES = ("folder", "cifar10", "imagenette", "imagewoof", "synthetic")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw", "lars")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Every enumerated key and its documented values. Values are canonical after loading:
# ALIASES maps what users may write (including what YAML makes of `no`/`off`) onto them.
CHOICES = {
    "data.source": DATA_SOURCES,
    "data.augment": ("auto", "per_image", "batched"),
    "data.on_bad_image": ("skip", "error"),
    "data.cache": ("auto", "decoded", "encoded", "none"),
    "model.head": ("mlp", "linear"),
    "model.resnet_init": ("timm", "torchvision"),
    "model.pos_embed": ("learned", "sincos"),
    "moco.momentum_schedule": ("constant", "cosine"),
    "moco.version": ("v2", "v3"),
    "moco.loss": ("infonce", "dcl"),
    "train.optimizer": OPTIMIZERS,
    "train.lr_schedule": ("cosine", "cosine_epoch_start", "cosine_epoch_end"),
    "train.precision": PRECISIONS,
    "train.log_with": ("none", "tensorboard", "wandb"),
    "eval.knn_features": ("backbone", "head"),
}
ALIASES = {
    "train.precision": {"fp32": "no", "off": "no", False: "no"},
    "data.cache": {"off": "none", False: "none"},
}


@dataclass
class DataConfig:
    source: str = "folder"  # one of DATA_SOURCES
    root: str = "data"  # folder source: an ImageFolder tree; others: download/cache folder
    train_dir: Optional[str] = None  # folder source: training images (default: root/train or root)
    val_dir: Optional[str] = None  # labelled images for the kNN monitor (default: carved from train)
    val_fraction: float = 0.1  # share of the training images held out when val_dir is unset (0: none)
    image_size: int = 224
    num_workers: int = -1  # -1: one per CPU core, at most 8
    download: bool = True  # built-in sources: fetch the data when it is not in root yet
    augment: str = "auto"  # per_image (CPU workers) | batched (decoded cache, on the device) | auto
    cache_dir: Optional[str] = None  # batched: image cache folder (default: root/.lowmem_moco_cache)
    cache: str = "auto"  # batched: decoded | encoded (JPEG bytes) | none (files each batch) | auto (by RAM, disk)
    on_bad_image: str = "skip"  # skip | error: what an unreadable image file does
    synthetic_size: int = 4000  # synthetic source: training images (validation adds 1/4)
    synthetic_classes: int = 10

    @property
    def workers(self) -> int:
        return min(8, os.cpu_count() or 1) if self.num_workers < 0 else self.num_workers


# A probability that may differ between the two views: one number (both views) or [view 1, view 2].
# View 1 is the query's (view number 0), view 2 the key's, as main_moco.py's augmentation1/2.
PerView = Union[float, list]


@dataclass
class AugmentConfig:
    """The training views' distribution; both view paths (per-image and batched) read it.

    Defaults are MoCo v2's (Chen et al. 2020, official main_moco.py with --aug-plus). Each
    probability (PER_VIEW) may be [view 1, view 2], as MoCo v3's (BYOL's) asymmetric views.
    """

    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area fraction
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect ratio
    jitter_prob: PerView = 0.8
    jitter: list = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    grayscale_prob: PerView = 0.2
    blur_prob: PerView = 0.5
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    # 0: the published blur, a Gaussian kernel reaching 4 sigma each side (data/blur.py: TRUNCATE).
    # N > 0 caps the kernel's half-width at N pixels: faster, no longer the published blur.
    blur_max_radius: int = 0
    # After the blur, pixels >= 0.5 (128 of 255) become 1 - x: PIL's ImageOps.solarize, MoCo v3's
    # Solarize. 0 (MoCo v2) leaves the views as they were, with no extra random draw.
    solarize_prob: PerView = 0.0
    flip_prob: PerView = 0.5
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))  # normalisation, also of eval views
    std: list = field(default_factory=lambda: list(IMAGENET_STD))

    def for_view(self, view: int) -> "AugmentConfig":
        """This section with each per-view probability resolved for view `view` (0 or 1)."""
        return dataclasses.replace(self, **{name: per_view(getattr(self, name), view) for name in PER_VIEW})


PER_VIEW = ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob")


def per_view(value, view: int) -> float:
    """A PerView value for view `view`: a single number is both views'."""
    return float(value[view]) if isinstance(value, (list, tuple)) else float(value)


# Length of each list-valued augment key, and the range its values must lie in.
AUGMENT_LISTS = {"crop_scale": 2, "crop_ratio": 2, "jitter": 4, "blur_sigma": 2, "mean": 3, "std": 3}


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # any timm model name
    small_image_stem: bool = False  # 32-px data: stride-1 stem where the family has one we can adapt
    head: str = "mlp"  # mlp: MoCo v2's Linear-ReLU-Linear | linear: MoCo v1's single Linear
    head_hidden_dim: Optional[int] = None  # MLP head hidden width (default: backbone width)
    dim: int = 128  # output (key/query) dimension
    # timm: timm's own init | torchvision: the official code's init (ResNets: zero_init_last=False;
    # other families are unchanged).
    resnet_init: str = "timm"
    # Extra timm.create_model arguments, e.g. {zero_init_last: false, drop_path_rate: 0.1,
    # channels: [32, 64, 128, 256]} (a narrower ResNet); see the model's timm constructor.
    timm_kwargs: dict = field(default_factory=dict)
    # ViTs (timm VisionTransformer with a patch embedding); other families log "not applied".
    # MoCo v3's --stop-grad-conv1: the patch projection keeps its random init, untrained.
    freeze_patch_embed: bool = False
    # learned: timm's | sincos: MoCo v3's fixed 2-D sin-cos table (vits.py), not trained
    pos_embed: str = "learned"


@dataclass
class MocoConfig:
    # v2: queue of negatives, MoCo v2's head | v3: no queue, in-batch negatives, MoCo v3's projector
    # and predictor (model.head_hidden_dim default 4096; v3 recipes set model.dim=256), the
    # representation-gradient cache step (engine/gradcache.py)
    version: str = "v2"
    loss: str = "infonce"  # infonce | dcl: decoupled contrastive loss, the positive left out of the denominator
    queue_size: int = 65536  # K negatives (v2 only)
    momentum: float = 0.999  # key-encoder EMA coefficient m
    momentum_schedule: str = "constant"  # constant | cosine (m rises to 1 over training)
    temperature: float = 0.2  # T of InfoNCE
    key_chunks: int = 8  # key batch split for per-chunk BatchNorm (shuffle BN on one GPU); per process
    symmetric: bool = False  # symmetric loss of the CIFAR-10 demo notebook
    shuffle_across_processes: bool = False  # N processes: shuffle the key batch across them (official shuffle BN)


@dataclass
class TrainConfig:
    batch_size: int = 256  # effective batch: one optimizer step, one enqueue
    # images per forward/backward (default: batch_size); auto: chosen at start-up (auto_batch.py)
    micro_batch_size: Optional[int] = None
    epochs: int = 200
    max_steps: Optional[int] = None  # stop after this many optimizer steps (schedule unchanged)
    # Stop (checkpoint saved, exit 130) before a step that would end past this much time after
    # start, e.g. 11h30m, 170m, 40s: a Colab session's limit. None: no limit.
    time_limit: Optional[str] = None
    # sgd (momentum 0.9) | adamw (on every parameter, as MoCo v3's ViTs) | lars (MoCo v3's ResNets:
    # momentum 0.9, trust 0.001; 1-D parameters skip weight decay and the trust ratio)
    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    # cosine: decays every step. Once per epoch, as the official code: cosine_epoch_start (main_moco.py,
    # the value at the epoch's start) | cosine_epoch_end (the CIFAR-10 notebook, the value at its end)
    lr_schedule: str = "cosine"
    precision: str = "no"  # no | fp16 | bf16
    grad_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbones of f_q and f_k; eager, with one warning, if it fails
    seed: int = 0
    checkpoint_every: int = 500  # optimizer steps between checkpoints (0: epoch ends only)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # optimizer steps between metric lines
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) steps before stopping
    log_with: str = "none"  # none | tensorboard | wandb: metrics.jsonl's records also go there (accelerate's trackers)


@dataclass
class EvalConfig:
    knn_every: int = 1  # epochs between kNN evaluations (0: never)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_train: int = 10000  # feature-bank size cap, for speed on big data sets (0: the whole set)
    knn_features: str = "backbone"  # backbone: pooled backbone features | head: the normalised head output


@dataclass
class Config:
    output_dir: str = "runs/moco"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size

    @property
    def accum_steps(self) -> int:
        return self.train.batch_size // self.micro_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
