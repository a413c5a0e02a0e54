"""The batched MoCo v2 views: same distributions and operations as the per-image path."""

import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lowmem_moco.augment import IMAGENET_MEAN, IMAGENET_STD, mocov2_transform
from lowmem_moco.batched_augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, BatchedMoCoV2, ViewParams, shift_hue

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def colourful(n=4, size=24, seed=0):
    """uint8 images with smooth colour gradients plus noise (every channel differs)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        1 - ramp[None, :].expand(size, size)])
    images = base[None] * 200 + torch.rand(n, 3, size, size, generator=g) * 55
    return images.round().clamp(0, 255).to(torch.uint8)


def plain_params(n, size, **overrides):
    """Full-image crop, nothing else applied; override fields to switch one thing on."""
    full = torch.full((n,), float(size))
    params = dict(top=torch.zeros(n), left=torch.zeros(n), height=full, width=full,
                  flip=torch.zeros(n, dtype=torch.bool), jitter=torch.zeros(n, dtype=torch.bool),
                  order=torch.arange(4).repeat(n, 1), brightness=torch.ones(n), contrast=torch.ones(n),
                  saturation=torch.ones(n), hue=torch.zeros(n), gray=torch.zeros(n, dtype=torch.bool),
                  blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n))
    params.update(overrides)
    return ViewParams(**params)


def unnormalise(views):
    return views.float() * STD + MEAN


def as_float(images):
    return TF.to_dtype(images, torch.float32, scale=True)


# ---------------------------------------------------------------------- output contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_dtype_layout_and_range(dtype):
    aug = BatchedMoCoV2(16)
    images = colourful(6, 24).contiguous(memory_format=torch.channels_last)  # the cache's NHWC layout
    q, k = aug.two_views(images, torch.Generator().manual_seed(0), dtype=dtype)
    for view in (q, k):
        assert view.shape == (6, 3, 16, 16) and view.dtype == dtype
        assert view.is_contiguous(memory_format=torch.channels_last)
        pixels = unnormalise(view)
        assert pixels.min() >= -0.01 and pixels.max() <= 1.01  # bf16 rounding
    with pytest.raises(ValueError):
        aug(images.float())


def test_fixed_seed_reproduces_the_batch():
    aug, images = BatchedMoCoV2(16), colourful(8, 24)
    a = aug.two_views(images, torch.Generator().manual_seed(7))
    b = aug.two_views(images, torch.Generator().manual_seed(7))
    c = aug.two_views(images, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_chunked_cpu_pass_equals_one_pass():
    aug, images = BatchedMoCoV2(16), colourful(10, 24)
    params = aug.sample_params(10, 24, 24, torch.Generator().manual_seed(3))
    whole = aug.apply(images, params)
    aug.cpu_chunk_elements = 3 * 16 * 16 * 3  # three views per chunk
    assert torch.allclose(aug.apply(images, params), whole, atol=1e-6)


def test_samples_are_independent():
    """Identical inputs get different views: one crop/colour per sample, not per batch."""
    images = colourful(1, 32).expand(16, -1, -1, -1).contiguous()
    q, k = BatchedMoCoV2(24).two_views(images, torch.Generator().manual_seed(0))
    flat = torch.cat([q, k]).flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(32) * 1e9
    assert distance.min() > 1e-3


# ---------------------------------------------------------------------- sampled parameters


def torchvision_crops(height, width, n, seed=0):
    torch.manual_seed(seed)
    boxes = [v2.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
             for _ in range(n)]
    return torch.tensor(boxes, dtype=torch.float64)  # (top, left, h, w)


@pytest.mark.parametrize("height,width", [(110, 110), (32, 32), (20, 100)])
def test_crop_area_and_aspect_distributions(height, width):
    p = BatchedMoCoV2(96).sample_params(20000, height, width, torch.Generator().manual_seed(0))
    area = p.height * p.width / (height * width)
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= height).all() and (p.left + p.width <= width).all()
    reference = torchvision_crops(height, width, 4000)
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    # Mean area and aspect spread agree with torchvision's sampler (4 standard errors).
    tol = 4 * ref_area.std().item() / math.sqrt(4000) + 0.005
    assert abs(area.mean().item() - ref_area.mean().item()) < tol
    if height == width:
        assert area.min() >= 0.2 - 4 / height and area.max() <= 1.0  # rounding of w and h
        log_ratio = torch.log(p.width / p.height)
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        assert log_ratio.min() >= lo - 0.1 and log_ratio.max() <= hi + 0.1
        if height > 100:  # small images quantise w/h too coarsely for a smooth histogram
            inside = log_ratio[(log_ratio > lo + 0.05) & (log_ratio < hi - 0.05)]
            counts = torch.histc(inside, bins=5, min=lo + 0.05, max=hi - 0.05)  # roughly uniform
            assert (counts / counts.mean() - 1).abs().max() < 0.15
    else:  # a wide image: most tries fail and the centred fallback box is used, as in torchvision
        ref_fallback = (reference[:, 2] == height).double().mean().item()
        fallback = (p.height == height).double().mean().item()
        assert abs(fallback - ref_fallback) < 0.05


def test_application_rates_and_factor_ranges():
    n = 40000
    p = BatchedMoCoV2(32).sample_params(n, 32, 32, torch.Generator().manual_seed(1))
    for flag, rate in [(p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.flip, 0.5)]:
        assert abs(flag.float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    assert ((p.brightness >= 0.6) & (p.brightness <= 1.4)).all() and abs(p.brightness.mean() - 1) < 0.01
    assert ((p.contrast >= 0.6) & (p.contrast <= 1.4)).all()
    assert ((p.saturation >= 0.6) & (p.saturation <= 1.4)).all()
    assert ((p.hue >= -0.1) & (p.hue <= 0.1)).all() and abs(p.hue.mean()) < 0.003
    assert ((p.sigma >= 0.1) & (p.sigma <= 2.0)).all()
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # permutations
    share = torch.stack([(p.order == op).float().mean(0) for op in range(4)])  # op x slot
    assert (share - 0.25).abs().max() < 0.02


def test_output_statistics_match_the_per_image_path():
    """Pixel mean and spatial contrast of many views agree with mocov2_transform's."""
    images = colourful(8, 40, seed=1)
    transform = mocov2_transform(32)
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-image ops stall with several threads on busy cores
    try:
        torch.manual_seed(0)
        reference = torch.stack([transform(pil[i % 8]) for i in range(400)])
        ours = BatchedMoCoV2(32)(images.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    # Seeded, so deterministic; the bounds are ~2 sampling standard errors of 400 views.
    assert (ours.mean(dim=(0, 2, 3)) - reference.mean(dim=(0, 2, 3))).abs().max() < 0.15
    contrast, ref_contrast = ours.std(dim=(2, 3)).mean(0), reference.std(dim=(2, 3)).mean(0)
    assert ((contrast - ref_contrast).abs() / ref_contrast).max() < 0.12


def test_grayscale_rate_seen_in_the_output():
    images = colourful(1, 16).expand(2000, -1, -1, -1).contiguous()
    out = unnormalise(BatchedMoCoV2(16)(images, torch.Generator().manual_seed(2)))
    gray = (out.amax(dim=1) - out.amin(dim=1)).flatten(1).amax(dim=1) < 1e-4
    assert abs(gray.float().mean().item() - 0.2) < 5 * math.sqrt(0.16 / 2000)


# ---------------------------------------------------------------------- each operation vs torchvision


def run(images, params, size=None):
    return unnormalise(BatchedMoCoV2(size or images.shape[-1]).apply(images, params))


def test_full_crop_is_the_image_and_flip_mirrors_it():
    images = colourful(3, 20)
    assert torch.allclose(run(images, plain_params(3, 20)), as_float(images), atol=1e-5)
    flipped = run(images, plain_params(3, 20, flip=torch.ones(3, dtype=torch.bool)))
    assert torch.allclose(flipped, as_float(images).flip(-1), atol=1e-5)


def test_crop_and_resize_match_torchvision_away_from_the_box_edge():
    images = colourful(2, 40)
    boxes = [(3, 5, 15, 12), (10, 0, 20, 30)]  # (top, left, h, w), upsampled to 32
    top, left, h, w = (torch.tensor([float(b[i]) for b in boxes]) for i in range(4))
    ours = run(images, plain_params(2, 40, top=top, left=left, height=h, width=w), size=32)
    for i, (t, l, hh, ww) in enumerate(boxes):
        ref = TF.resized_crop(as_float(images[i]), t, l, hh, ww, [32, 32], antialias=True)
        # Bilinear sampling also sees one pixel beyond the box edge; inside it is the same.
        assert torch.allclose(ours[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4)


@pytest.mark.parametrize("op,field,value,reference", [
    (BRIGHTNESS, "brightness", 1.35, TF.adjust_brightness),
    (BRIGHTNESS, "brightness", 0.62, TF.adjust_brightness),
    (CONTRAST, "contrast", 1.3, TF.adjust_contrast),
    (CONTRAST, "contrast", 0.7, TF.adjust_contrast),
    (SATURATION, "saturation", 1.4, TF.adjust_saturation),
    (SATURATION, "saturation", 0.6, TF.adjust_saturation),
    (HUE, "hue", 0.1, TF.adjust_hue),
    (HUE, "hue", -0.07, TF.adjust_hue),
])
def test_each_colour_operation_matches_torchvision(op, field, value, reference):
    images = colourful(3, 16)
    for slot in range(4):  # the operation gives the same result in whichever slot it runs
        order = torch.tensor([op] + [o for o in range(4) if o != op])
        order = torch.roll(order, slot).repeat(3, 1)
        params = plain_params(3, 16, jitter=torch.ones(3, dtype=torch.bool), order=order,
                              **{field: torch.full((3,), value)})
        expected = torch.stack([reference(as_float(img), value) for img in images])
        assert torch.allclose(run(images, params), expected, atol=2e-5)


def test_jitter_in_random_order_matches_torchvision_sequence():
    images = colourful(4, 16, seed=5)
    g = torch.Generator().manual_seed(4)
    params = BatchedMoCoV2(16).sample_params(4, 16, 16, g)
    params = plain_params(4, 16, jitter=torch.ones(4, dtype=torch.bool), order=params.order,
                          brightness=params.brightness, contrast=params.contrast,
                          saturation=params.saturation, hue=params.hue)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    for i in range(4):
        expected = as_float(images[i])
        for op in params.order[i].tolist():
            expected = ops[op](expected, factors[op][i].item())
        assert torch.allclose(run(images, params)[i], expected, atol=2e-5)


def test_grayscale_and_blur_match_torchvision():
    images = colourful(3, 20)
    gray = run(images, plain_params(3, 20, gray=torch.ones(3, dtype=torch.bool)))
    assert torch.allclose(gray, TF.rgb_to_grayscale(as_float(images), num_output_channels=3), atol=1e-5)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    blurred = run(images, plain_params(3, 20, blur=torch.ones(3, dtype=torch.bool), sigma=sigma))
    k = BatchedMoCoV2(20).kernel_size
    for i in range(3):
        expected = TF.gaussian_blur(as_float(images[i]), [k, k], [sigma[i].item()] * 2)
        assert torch.allclose(blurred[i], expected, atol=1e-5)


def test_hue_shift_matches_torchvision_on_edge_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[0] = 0.5  # gray: hue undefined, must stay gray
    x[1, 0], x[1, 1] = 1.0, 1.0  # ties between channels
    x[2] = (x[2] * 4).round() / 4  # many exact ties
    for shift in [-0.5, -0.1, 0.0, 0.033, 0.1, 0.5]:
        expected = torch.stack([TF.adjust_hue(img, shift) for img in x])
        assert torch.allclose(shift_hue(x.clone(), torch.full((6,), shift)), expected, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator():
    aug, images = BatchedMoCoV2(32), colourful(8, 40)
    cpu = aug.two_views(images, torch.Generator().manual_seed(0))
    gpu = aug.two_views(images.cuda(), torch.Generator().manual_seed(0))
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-3)
