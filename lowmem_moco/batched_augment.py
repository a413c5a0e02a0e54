"""MoCo v2 views for a whole batch at once, on the device that trains.

    augment = BatchedMoCoV2(image_size=224)
    g = torch.Generator(device).manual_seed(batch_seed)
    view_q, view_k = augment.two_views(images_uint8, generator=g, dtype=torch.bfloat16)

Every sample draws its own parameters, with the distributions of the per-image path
(`augment.mocov2_transform`): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, torchvision's
rejection sampling), ColorJitter(0.4, 0.4, 0.4, 0.1) in a per-sample random order with
p=0.8, grayscale p=0.2, Gaussian blur (sigma 0.1-2, reflect padding) p=0.5, horizontal
flip p=0.5, normalisation. The colour operations follow torchvision's definitions on
float images, each clamping to [0, 1].

How it stays cheap: crop, resize and flip of all samples are one `grid_sample` over
per-sample affine boxes (bilinear; no antialiasing, which is fine because the decoded
cache stores images at most ~1.15x the crop size); brightness, contrast and saturation
are per-sample affine maps over the whole batch; only the hue shift, grayscale and blur
run on the subset that needs them. On a CPU the work goes in cache-sized chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision ColorJitter's fn_idx numbering
CROP_TRIES = 10  # torchvision RandomResizedCrop's rejection-sampling attempts


@dataclass
class ViewParams:
    """The random parameters of N views, one row per sample (exposed for tests and debugging)."""

    top: torch.Tensor  # (N,) crop box in source pixels (integer values, as torchvision's)
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N,) bool: colour jitter applied
    order: torch.Tensor  # (N, 4) long: the jitter operations in the order they run
    brightness: torch.Tensor  # (N,) factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) blur sigma

    def to(self, device) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, rows) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


class BatchedMoCoV2:
    """uint8 images (N, 3, H, W) on any device -> normalised MoCo v2 views (N, 3, S, S).

    Output is channels_last in the requested dtype; the work is done in float32. Pass a
    `torch.Generator` for reproducible draws (same seed, same batch); it may live on the
    images' device or on the CPU (a CPU generator draws the same views on every device).
    """

    cpu_chunk_elements = 2**20  # float32 values per chunk of views on a CPU (4 MB: stays in cache)
    gpu_chunk_elements = 2**25  # on a GPU (128 MB: ~220 views at 224 px; peak scratch ~1 GB)

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                 p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), p_flip=0.5):
        self.size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio, self.jitter = scale, ratio, jitter
        self.p_jitter, self.p_gray, self.p_blur, self.sigma, self.p_flip = p_jitter, p_gray, p_blur, sigma, p_flip
        self.kernel_size = blur_kernel_size(image_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"jitter={self.jitter} p={self.p_jitter}, gray p={self.p_gray}, "
                f"blur k={self.kernel_size} sigma={self.sigma} p={self.p_blur}, flip p={self.p_flip})")

    # ------------------------------------------------------------------ entry points

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator, images.device)
        return self.apply(images, params, dtype)

    def two_views(self, images: torch.Tensor, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of every image (query, key), made in one pass over 2N views."""
        n = images.shape[0]
        params = self.sample_params(2 * n, images.shape[-2], images.shape[-1], generator, images.device)
        views = self.apply(images, params, dtype, repeats=2)
        return views[:n], views[n:]

    # ------------------------------------------------------------------ random parameters

    def sample_params(self, n: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> ViewParams:
        """Draw the parameters of n views of (height x width) images, returned on `device`."""
        rng = generator.device if generator is not None else torch.device(device or "cpu")

        def uniform(lo, hi, *shape):  # float64, like the Python floats torchvision draws
            return torch.rand(*shape, generator=generator, device=rng, dtype=torch.float64) * (hi - lo) + lo

        def coin(p):
            return torch.rand(n, generator=generator, device=rng) < p

        # Random resized crop: torchvision's 10 tries, vectorised; the first try that fits wins.
        target = height * width * uniform(*self.scale, n, CROP_TRIES)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), n, CROP_TRIES))
        w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
        # No try fits: the largest centred box whose aspect ratio is allowed.
        in_ratio = width / height
        fallback_w = width if in_ratio <= max(self.ratio) else round(height * max(self.ratio))
        fallback_h = height if in_ratio >= min(self.ratio) else round(width / min(self.ratio))
        w, h = torch.where(found, w, float(fallback_w)), torch.where(found, h, float(fallback_h))
        top = torch.where(found, torch.floor(uniform(0, 1, n) * (height - h + 1)), torch.floor((height - h) / 2))
        left = torch.where(found, torch.floor(uniform(0, 1, n) * (width - w + 1)), torch.floor((width - w) / 2))

        b, c, s, hue = self.jitter
        params = ViewParams(
            top=top, left=left, height=h, width=w,
            flip=coin(self.p_flip),
            jitter=coin(self.p_jitter),
            order=torch.rand(n, 4, generator=generator, device=rng).argsort(dim=1),  # a permutation per row
            brightness=uniform(max(0.0, 1 - b), 1 + b, n), contrast=uniform(max(0.0, 1 - c), 1 + c, n),
            saturation=uniform(max(0.0, 1 - s), 1 + s, n), hue=uniform(-hue, hue, n),
            gray=coin(self.p_gray),
            blur=coin(self.p_blur), sigma=uniform(*self.sigma, n),
        )
        if device is not None:
            params = params.to(device)
        for f in fields(params):  # float32 for the work
            value = getattr(params, f.name)
            if value.dtype == torch.float64:
                setattr(params, f.name, value.float())
        return params

    # ------------------------------------------------------------------ the pass

    def apply(self, images: torch.Tensor, p: ViewParams, dtype: torch.dtype = torch.float32,
              repeats: int = 1) -> torch.Tensor:
        """Views with parameters `p`; with repeats=r, view k is made from image k % N."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        n, _, height, width = images.shape
        device, size = images.device, self.size
        if p.top.shape[0] != repeats * n:
            raise ValueError(f"{p.top.shape[0]} sets of parameters for {repeats} x {n} views")
        out = torch.empty(repeats * n, 3, size, size, dtype=dtype, device=device, memory_format=torch.channels_last)
        scale = 1.0 / torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        shift = -torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * scale
        # A CPU runs the many elementwise passes several times faster on chunks that stay in
        # cache; a GPU prefers large launches, in chunks that cap the scratch memory.
        limit = self.cpu_chunk_elements if device.type == "cpu" else self.gpu_chunk_elements
        chunk = max(1, limit // (3 * size * size))
        work = _Buffers()  # scratch reused by every chunk: fresh CPU memory costs page faults
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            source = images[start:stop].float()  # once for all repeats; crops sample from it
            for r in range(repeats):
                views = slice(r * n + start, r * n + stop)
                chunk_params = p[views]
                grid = _crop_grid(chunk_params, height, width, size)
                x = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
                x = self._colour(x.mul_(1.0 / 255), chunk_params, work)
                torch.addcmul(shift, x, scale, out=out[views])  # normalise; writes dtype and layout
        return out

    def _colour(self, x: torch.Tensor, p: ViewParams, work: "_Buffers") -> torch.Tensor:
        """Jitter, grayscale and blur, in place, of one chunk of float views in [0, 1]."""
        n = x.shape[0]
        ones, zeros = torch.ones_like(p.brightness), torch.zeros_like(p.brightness)
        gray = work.get("gray", (n, 1) + x.shape[2:], x)
        for slot in range(4):  # every sample runs the operation its own order puts in this slot
            op = torch.where(p.jitter, p.order[:, slot], -1)  # -1: this sample is not jittered
            # Brightness, contrast and saturation are all clamp(a*x + g*gray(x) + d, 0, 1):
            # brightness a=b; contrast a=c, d=(1-c)*mean(gray); saturation a=s, g=1-s.
            # Any other sample gets a=1, g=d=0, which leaves it exactly as it is.
            _grayscale(x, out=gray)
            a = torch.where(op == BRIGHTNESS, p.brightness,
                            torch.where(op == CONTRAST, p.contrast, torch.where(op == SATURATION, p.saturation, ones)))
            g = torch.where(op == SATURATION, 1.0 - p.saturation, zeros)
            d = torch.where(op == CONTRAST, (1.0 - p.contrast) * gray.mean(dim=(1, 2, 3)), zeros)
            gray.mul_(g[:, None, None, None]).add_(d[:, None, None, None])
            x.mul_(a[:, None, None, None]).add_(gray).clamp_(0.0, 1.0)
            # Hue is not affine: shift only the samples whose order puts it in this slot.
            _on_subset(x, op == HUE, work, lambda y, i: shift_hue(y, p.hue[i], work))
        _on_subset(x, p.gray, work, lambda y, i: _grayscale(y, out=work.get("gray", (len(i), 1) + y.shape[2:], y)))
        _on_subset(x, p.blur, work, lambda y, i: _gaussian_blur(y, p.sigma[i], self.kernel_size))
        return x


class _Buffers:
    """Named scratch tensors, grown on demand and handed out as views of the size asked for."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < size:
            buf = self.store[name] = torch.empty(size, dtype=dtype, device=like.device)
        return buf[:size].view(shape)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, work: _Buffers, fn) -> None:
    """x[mask] = fn(x[mask], indices), in place; fn may return a tensor broadcastable to the subset."""
    index = torch.nonzero(mask).squeeze(1)
    k = index.numel()
    if k == 0:
        return
    if k == x.shape[0]:
        x.copy_(fn(x, index).expand_as(x))
        return
    subset = torch.index_select(x, 0, index, out=work.get("subset", (k,) + x.shape[1:], x))
    x.index_copy_(0, index, fn(subset, index).expand_as(subset))


# ---------------------------------------------------------------------- building blocks


def _crop_grid(p: ViewParams, height: int, width: int, size: int) -> torch.Tensor:
    """(N, S, S, 2) sampling grid (grid_sample's align_corners=False coordinates) of each box.

    Output pixel u lands on input pixel left + (u + 0.5) * w / S - 0.5, the pixel-centre
    convention of torchvision's resize; a flip mirrors the box about its centre.
    """
    centres = (torch.arange(size, device=p.top.device) + 0.5) / size  # (S,) in (0, 1)
    xs = torch.where(p.flip[:, None], 1.0 - centres, centres)
    xs = (p.left[:, None] + xs * p.width[:, None]) * (2.0 / width) - 1.0  # (N, S)
    ys = (p.top[:, None] + centres * p.height[:, None]) * (2.0 / height) - 1.0
    n = xs.shape[0]
    return torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], dim=-1)


def _grayscale(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1, H, W) luma with torchvision's weights."""
    out = torch.mul(x[:, 0:1], GRAY_WEIGHTS[0], out=out)
    return out.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def shift_hue(x: torch.Tensor, shift: torch.Tensor, work: _Buffers | None = None) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by shift[i] turns in HSV (S and V kept), in place.

    Same maths as torchvision's adjust_hue; written with preallocated planes because on a
    CPU fresh tensors (page faults) cost more than the arithmetic.
    """
    work = work or _Buffers()
    plane = (x.shape[0],) + x.shape[2:]
    r, g, b = x.unbind(dim=1)
    value = torch.maximum(torch.maximum(r, g, out=work.get("value", plane, x)), b, out=work.get("value", plane, x))
    low = torch.minimum(torch.minimum(r, g, out=work.get("low", plane, x)), b, out=work.get("low", plane, x))
    chroma = torch.sub(value, low, out=work.get("chroma", plane, x))  # = V * S
    # Hue in sixths of a turn, by the sector of the largest channel (red, then green, then blue on ties).
    blue = torch.sub(r, g, out=work.get("hue_a", plane, x)).add_(chroma, alpha=4.0)
    other = torch.sub(b, r, out=work.get("hue_b", plane, x)).add_(chroma, alpha=2.0)
    mask = torch.eq(value, g, out=work.get("mask", plane, x, torch.bool))
    hue6 = torch.where(mask, other, blue, out=work.get("hue_c", plane, x))
    other = torch.sub(g, b, out=work.get("hue_b", plane, x))
    mask = torch.eq(value, r, out=work.get("mask", plane, x, torch.bool))
    hue6 = torch.where(mask, other, hue6, out=work.get("hue_a", plane, x))
    divisor = torch.clamp(chroma, min=1e-12, out=work.get("hue_b", plane, x))  # gray pixels: 0 / tiny = 0
    hue6.div_(divisor).add_(6.0 * shift[:, None, None])
    wrapped = torch.mul(hue6, 1.0 / 6.0, out=work.get("hue_b", plane, x)).floor_()
    hue6.sub_(wrapped, alpha=6.0)  # in [0, 6)
    # HSV -> RGB: channel = min + C * clamp(d - 1, 0, 1), d the circular distance (in sixths) from
    # the hue to the channel's opposite (cyan 3, magenta 5, yellow 1 for R, G, B). With
    # s = 3 - d = |(|hue - opposite|) - 3|, that is (min + 2C) - C * clamp(s, 1, 2).
    t = torch.sub(hue6[:, None], _OPPOSITE.to(x.device), out=work.get("ramp", x.shape, x))
    t.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return torch.addcmul(low.add_(chroma, alpha=2.0)[:, None], chroma[:, None], t, value=-1.0, out=x)


_OPPOSITE = torch.tensor([3.0, 5.0, 1.0]).view(1, 3, 1, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, reflect padding (as torchvision's)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    taps = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    taps = (taps / taps.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    # One grouped convolution per axis: every (image, channel) plane has its own kernel.
    y = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, n * c, h + 2 * half, w + 2 * half)
    y = F.conv2d(y, taps[:, None, None, :], groups=n * c)
    y = F.conv2d(y, taps[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)
