"""The batched MoCo v2 views: contract, per-sample seeding, and each operation against torchvision.

Statistical comparisons with torchvision's transforms are in test_views_statistics.py.
"""

import math

import numpy as np
import pytest
import torch
from PIL import ImageOps
from torchvision.transforms.v2 import functional as TF

from lowmem_moco.data.augment.batched import BatchedMoCoV2, ViewParams
from lowmem_moco.data.augment.blur import gaussian_blur
from lowmem_moco.data.augment.colour import BRIGHTNESS, CONTRAST, HUE, SATURATION, shift_hue, solarize
from lowmem_moco.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from lowmem_moco.data.stores.ragged import RaggedImages

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def colourful(n=4, height=24, width=None, seed=0):
    """uint8 images (n, 3, H, W) with smooth colour gradients plus noise (every channel differs)."""
    width = width or height
    g = torch.Generator().manual_seed(seed)
    x, y = torch.linspace(0, 1, width)[None, :].expand(height, width), torch.linspace(0, 1, height)[:, None]
    base = torch.stack([x, y.expand(height, width), 1 - x])
    images = base[None] * 200 + torch.rand(n, 3, height, width, generator=g) * 55
    return images.round().clamp(0, 255).to(torch.uint8)


def ragged(*shapes, seed=0):
    """RaggedImages of colourful images of the given (height, width)s."""
    return RaggedImages.from_arrays([colourful(1, h, w, seed + i)[0].permute(1, 2, 0).numpy()
                                     for i, (h, w) in enumerate(shapes)])


def plain_params(n, height, width=None, **overrides):
    """Full-image crop, nothing else applied; override fields to switch one thing on."""
    width = width or height
    params = dict(box=torch.tensor([[0.0, 0.0, height, width]] * n, dtype=torch.float64),
                  flip=torch.zeros(n, dtype=torch.bool), jitter=torch.zeros(n, dtype=torch.bool),
                  order=torch.arange(4).repeat(n, 1), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
                  gray=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n),
                  solarize=torch.zeros(n, dtype=torch.bool))
    params.update(overrides)
    return ViewParams(**params)


def run(images, params, size=None):
    """Unnormalised views of a uint8 batch (N, 3, H, W) with the given parameters."""
    aug = BatchedMoCoV2(size or images.shape[-1])
    return aug.apply(RaggedImages.from_tensor(images), params, normalize=False)


def as_float(images):
    return TF.to_dtype(images, torch.float32, scale=True)


# ---------------------------------------------------------------------- output contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_dtype_layout_and_range(dtype):
    aug = BatchedMoCoV2(16)
    q, k = aug.two_views(ragged((24, 30), (40, 20), (16, 16)), torch.tensor([1, 2, 3]), dtype=dtype)
    for view in (q, k):
        assert view.shape == (3, 3, 16, 16) and view.dtype == dtype
        assert view.is_contiguous()  # NCHW: the pipeline lays views out for the model
        pixels = view.float() * STD + MEAN
        assert pixels.min() >= -0.01 and pixels.max() <= 1.01  # bf16 rounding
    unnormalised = aug(ragged((24, 30)), torch.tensor([1]), normalize=False)
    assert unnormalised.min() >= 0 and unnormalised.max() <= 1
    with pytest.raises(ValueError):
        aug(colourful(2, 16).float(), torch.tensor([1, 2]))


def test_views_depend_only_on_each_samples_seed():
    """The same image with the same seed gets identical views in any batch, at any position."""
    aug = BatchedMoCoV2(24)
    shapes = [(30, 40), (40, 30), (24, 24), (50, 35), (33, 47)]
    a_q, a_k = aug.two_views(ragged(*shapes), torch.tensor([11, 12, 13, 14, 15]))
    b_q, b_k = aug.two_views(ragged(shapes[3], shapes[1], seed=0), torch.tensor([14, 12]))  # other batch
    c_q, _ = aug.two_views(ragged(shapes[3], seed=3), torch.tensor([14]))  # alone
    assert torch.equal(b_k[1], a_k[1])  # image 1 was position 1 in both
    assert torch.equal(ragged(shapes[3], seed=3).image(0), ragged(*shapes).image(3))
    assert torch.equal(c_q[0], a_q[3])  # position 3 of five vs a batch of one
    assert not torch.equal(a_q, aug.two_views(ragged(*shapes), torch.tensor([21, 22, 23, 24, 25]))[0])
    assert not torch.equal(a_q, a_k)


def test_chunked_cpu_pass_equals_one_pass():
    aug, images = BatchedMoCoV2(16), ragged(*[(24, 30)] * 10)
    params = aug.sample_params(torch.arange(10), images.shapes, views=(0, 1))
    whole = aug.apply(images, params)
    aug.cpu_chunk_elements = 3 * 16 * 16 * 3  # three views per chunk
    assert torch.equal(aug.apply(images, params), whole)


def test_samples_are_independent():
    """Identical inputs with different seeds get different views."""
    images = RaggedImages.from_tensor(colourful(1, 32).expand(16, -1, -1, -1))
    q, k = BatchedMoCoV2(24).two_views(images, torch.arange(16))
    flat = torch.cat([q, k]).flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(32) * 1e9
    assert distance.min() > 1e-3


def test_parameters_follow_the_augment_section():
    n = 40000
    aug = AugmentConfig(jitter_prob=0.3, grayscale_prob=0.6, blur_prob=0.1, flip_prob=0.9,
                        jitter=[0.2, 0.5, 0.1, 0.05], blur_sigma=[0.5, 1.5])
    p = BatchedMoCoV2(32, aug).sample_params(torch.arange(n), torch.tensor([[32, 32]]).expand(n, 2))
    for flag, rate in [(p.jitter, 0.3), (p.gray, 0.6), (p.blur, 0.1), (p.flip, 0.9)]:
        assert abs(flag.float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    lows, highs = p.factors.min(0).values, p.factors.max(0).values
    assert torch.allclose(lows, torch.tensor([0.8, 0.5, 0.9, -0.05]), atol=1e-3)
    assert torch.allclose(highs, torch.tensor([1.2, 1.5, 1.1, 0.05]), atol=1e-3)
    assert 0.5 <= p.sigma.min() and p.sigma.max() <= 1.5
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # permutations
    share = torch.stack([(p.order == op).float().mean(0) for op in range(4)])  # op x slot
    assert (share - 0.25).abs().max() < 0.02


def test_each_view_reads_its_own_probabilities():
    """blur_prob [1.0, 0.1] and solarize_prob [0, 0.2] (MoCo v3): each view's rates, within 5 standard errors."""
    n = 40000
    aug = AugmentConfig(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2], flip_prob=[0.5, 0.9])
    shapes = torch.tensor([[32, 32]]).expand(n, 2)
    p = BatchedMoCoV2(32, aug).sample_params(torch.arange(n), shapes, views=(0, 1))
    for view, rates in ((0, {"blur": 1.0, "solarize": 0.0, "flip": 0.5}), (1, {"blur": 0.1, "solarize": 0.2, "flip": 0.9})):
        rows = p[view * n:(view + 1) * n]
        for name, rate in rates.items():
            found = getattr(rows, name).float().mean().item()
            assert abs(found - rate) <= 5 * math.sqrt(rate * (1 - rate) / n), (view, name)


def test_one_value_per_view_draws_the_views_of_a_single_value():
    """[p, p] is p: the same views, bit for bit (so v2 recipes' views are unchanged by the per-view keys)."""
    images, seeds = ragged((30, 40), (40, 30), (24, 24)), torch.tensor([3, 4, 5])
    single = BatchedMoCoV2(16).two_views(images, seeds)
    doubled = AugmentConfig(blur_prob=[0.5, 0.5], solarize_prob=[0.0, 0.0], jitter_prob=[0.8, 0.8])
    for a, b in zip(single, BatchedMoCoV2(16, doubled).two_views(images, seeds)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- each operation vs torchvision


def test_solarize_is_torchvisions_at_half_and_pils_at_128():
    """Solarized views equal torchvision's solarize(threshold=0.5) of the float image, and PIL's
    ImageOps.solarize (threshold 128, the official Solarize) of the uint8 pixels to float rounding
    (1 - i/255 against (255 - i)/255), inverting exactly the same pixels."""
    images = colourful(3, 20)
    ours = run(images, plain_params(3, 20, solarize=torch.ones(3, dtype=torch.bool)))
    assert torch.equal(ours, TF.solarize(as_float(images), 0.5))
    for i in range(3):
        pil = TF.pil_to_tensor(ImageOps.solarize(TF.to_pil_image(images[i])))
        assert (ours[i] - as_float(pil)).abs().max() <= 1e-7
        assert torch.equal(ours[i] != as_float(images[i]), pil != images[i])
    values = torch.tensor([0.4999, 0.5, 0.7]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    assert torch.equal(solarize(values)[0, :, 0, 0], torch.tensor([0.4999, 0.5, 1 - 0.7]))




def test_full_crop_is_the_image_and_flip_mirrors_it():
    images = colourful(3, 20)
    assert torch.equal(run(images, plain_params(3, 20)), as_float(images))
    flipped = run(images, plain_params(3, 20, flip=torch.ones(3, dtype=torch.bool)))
    assert torch.equal(flipped, as_float(images).flip(-1))


@pytest.mark.parametrize("size", [32, 96, 224])
def test_crop_and_resize_are_torchvisions_antialiased_resized_crop(size):
    """Down- and upscaling boxes of a 375x500 photo-sized image: torchvision's uint8 result, exactly."""
    image = colourful(1, 375, 500, seed=2)[0]
    boxes = [(0, 0, 375, 500), (40, 100, 300, 260), (200, 310, 60, 45)]  # (top, left, h, w)
    params = plain_params(3, 375, 500, box=torch.tensor(boxes, dtype=torch.float64))
    ours = BatchedMoCoV2(size).apply(RaggedImages.from_tensor(image[None]), params, normalize=False)
    for i, (top, left, h, w) in enumerate(boxes):
        expected = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        assert torch.equal(ours[i], as_float(expected))


@pytest.mark.parametrize("op,value,reference", [
    (BRIGHTNESS, 1.35, TF.adjust_brightness), (BRIGHTNESS, 0.62, TF.adjust_brightness),
    (CONTRAST, 1.3, TF.adjust_contrast), (CONTRAST, 0.7, TF.adjust_contrast),
    (SATURATION, 1.4, TF.adjust_saturation), (SATURATION, 0.6, TF.adjust_saturation),
    (HUE, 0.1, TF.adjust_hue), (HUE, -0.07, TF.adjust_hue),
])
def test_each_colour_operation_matches_torchvision(op, value, reference):
    """Same parameters, same result: max abs error 2e-6 (float rounding) in every slot of the order."""
    images = colourful(3, 16)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 3)
    factors[:, op] = value
    for slot in range(4):  # the operation gives the same result in whichever slot it runs
        order = torch.roll(torch.tensor([op] + [o for o in range(4) if o != op]), slot).repeat(3, 1)
        params = plain_params(3, 16, jitter=torch.ones(3, dtype=torch.bool), order=order, factors=factors)
        expected = torch.stack([reference(as_float(img), value) for img in images])
        assert (run(images, params) - expected).abs().max() <= 2e-6


def test_jitter_in_random_order_matches_torchvision_sequence():
    images = colourful(4, 16, seed=5)
    sampled = BatchedMoCoV2(16).sample_params(torch.arange(4), torch.tensor([[16, 16]] * 4))
    params = plain_params(4, 16, jitter=torch.ones(4, dtype=torch.bool), order=sampled.order, factors=sampled.factors)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ours = run(images, params)
    for i in range(4):
        expected = as_float(images[i])
        for op in params.order[i].tolist():
            expected = ops[op](expected, params.factors[i, op].item())
        assert (ours[i] - expected).abs().max() <= 5e-6


def test_grayscale_and_blur_match_torchvision():
    images = colourful(3, 20)
    gray = run(images, plain_params(3, 20, gray=torch.ones(3, dtype=torch.bool)))
    assert (gray - TF.rgb_to_grayscale(as_float(images), num_output_channels=3)).abs().max() <= 1e-6
    sigma = torch.tensor([0.1, 0.9, 2.0])
    blurred = run(images, plain_params(3, 20, blur=torch.ones(3, dtype=torch.bool), sigma=sigma))
    for i in range(3):  # torchvision's kernel of the same width (4 sigma each side), reflect padding
        k = 2 * math.ceil(4 * sigma[i].item()) + 1
        expected = TF.gaussian_blur(as_float(images[i]), [k, k], [sigma[i].item()] * 2)
        assert (blurred[i] - expected).abs().max() <= 1e-5


def test_blur_cap_is_a_truncated_kernel():
    x = as_float(colourful(2, 24))
    capped = gaussian_blur(x, torch.tensor([2.0, 0.5]), max_radius=3)
    expected = TF.gaussian_blur(x[0], [7, 7], [2.0, 2.0])
    assert (capped[0] - expected).abs().max() <= 1e-5
    assert torch.equal(capped[1], gaussian_blur(x[1:], torch.tensor([0.5]))[0])  # radius 2 < cap: unchanged


def test_hue_shift_matches_torchvision_on_edge_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[0] = 0.5  # gray: hue undefined, must stay gray
    x[1, 0], x[1, 1] = 1.0, 1.0  # ties between channels
    x[2] = (x[2] * 4).round() / 4  # many exact ties
    for shift in [-0.5, -0.1, 0.0, 0.033, 0.1, 0.5]:
        expected = torch.stack([TF.adjust_hue(img, shift) for img in x])
        assert (shift_hue(x.clone(), torch.full((6,), shift)) - expected).abs().max() <= 2e-6


def test_ragged_batches_round_trip():
    arrays = [np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) for h, w in [(2, 3), (4, 1), (1, 1)]]
    batch = RaggedImages.from_arrays(arrays)
    assert len(batch) == 3 and batch.shapes.tolist() == [[2, 3], [4, 1], [1, 1]]
    for i, array in enumerate(arrays):
        assert torch.equal(batch.image(i), torch.from_numpy(array).permute(2, 0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_views_as_the_cpu():
    aug, images, seeds = BatchedMoCoV2(32), ragged((40, 50), (50, 40), (32, 32)), torch.tensor([5, 6, 7])
    cpu = aug.two_views(images, seeds, normalize=False)
    gpu = aug.two_views(images.to("cuda"), seeds.cuda(), normalize=False)
    for a, b in zip(cpu, gpu):  # the CPU rounds resized crops to uint8, as torchvision's uint8 path
        assert (a - b.cpu()).abs().max() <= 3 / 255  # crops rounded on the CPU, then jitter (<= 1.4x twice)


def test_ragged_select_gathers_the_chosen_images_in_order():
    batch = ragged((24, 30), (40, 20), (16, 16))
    chosen = batch.select(torch.tensor([2, 0, 2]))
    assert chosen.shapes.tolist() == [[16, 16], [24, 30], [16, 16]]
    for got, want in zip(chosen.images(), [batch.image(2), batch.image(0), batch.image(2)]):
        assert torch.equal(got, want)
    assert len(batch.select([])) == 0
