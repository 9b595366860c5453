"""Method-agnostic helpers shared by adco.py, caco.py, moco_co2.py and linear_eval.py.

Rule (README, "Layout"): method-agnostic code only: the ResNet factory, datasets, crop wrappers, the
augmentation *operators* and their two executors (not their values), the loaders and the kNN classifier.
Losses, negatives, schedules, EMA and augmentation values stay inline in each method file, where a reader of
that one file can audit them. One part here could shift accuracy silently, the batched device executor, so
tests/test_augment.py checks it against torchvision's own transforms, operator by operator and as a whole.

Contents
    UserError                  one clear message, no traceback (caught in each script's entry point)
    build_resnet               torchvision ResNet without fc (+ optional 3x3 small-image stem)
    GaussianBlur, Solarize     PIL operators used inside torchvision pipelines (torch RNG, so seeded runs repeat)
    TwoCrops, MultiCrop        apply several pipelines to one image
    View, pil_pipeline, pil_views   one view's augmentation (values set by each method file) -> PIL pipeline
    DeviceAugment              the same views batched on the training device, per-sample parameters
                               (sample_crops, resized_crop, color_jitter, gaussian_blur, ...: torchvision's semantics)
    eval_transform             Resize(size*256/224; small images whole) + CenterCrop + normalise (val / kNN)
    SyntheticImages            deterministic labelled fake images (no download; smoke runs and tests)
    make_dataset               `imagefolder` (ImageNet layout), cifar10/cifar100/stl10 (torchvision) or
                               `synthetic`, with clear errors
    check_same_classes         refuse a val split whose class names (or their order) differ from train's
    ResumableSampler, make_loader   DistributedSampler that can restart mid-epoch; DataLoader factory
    DeviceLoader               --augment-on device: in-memory datasets on the device, or JPEGs decoded there
    extract_features, knn_predict, knn_accuracy   weighted kNN (InstDisc rule, k=200, T=0.1 by default)
"""

import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A handful of ImageNet training JPEGs exceed PIL's decompression-bomb limit and warn or crash
# (facebookresearch/moco #73). They are legitimate photos, so lift the limit.
Image.MAX_IMAGE_PIXELS = None


class UserError(Exception):
    """A problem with the user's input (paths, sizes, checkpoints). Printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------
def build_resnet(arch: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """torchvision ResNet with `fc` replaced by Identity -> (backbone, feature dim).

    The parameter names are torchvision's (conv1.weight, layer1.0.bn1.running_mean, ...), so a backbone
    state dict loads into `torchvision.models.<arch>()` with only `fc.*` missing.
    `small_stem`: 3x3 stride-1 conv1 and no max-pool, the usual CIFAR (32 px) stem. With it the
    conv1 weight is 64x3x3x3 instead of 64x3x7x7, so it no longer loads into a stock torchvision ResNet.
    """
    if arch not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        raise UserError(f"unknown --arch {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None)  # default torchvision init, as all three papers
    feat_dim = net.fc.in_features  # 512 for resnet18/34, 2048 for resnet50+
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
        net.maxpool = nn.Identity()
    return net, feat_dim


# ---------------------------------------------------------------------------------------------------
# Augmentation operators (the probabilities and strengths are set inline in each method file)
# ---------------------------------------------------------------------------------------------------
class GaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U[sigma_min, sigma_max] (SimCLR/MoCo v2: [0.1, 2.0]).

    PIL derives the kernel from the radius; there is no kernel-size parameter (lightly #1051).
    sigma is drawn from torch's RNG (not `random`), so a seeded run and a resumed run draw the same values.
    """

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma=({self.sigma_min}, {self.sigma_max}))"


class Solarize:
    """PIL solarize: invert every pixel value >= threshold (BYOL: threshold 128). Wrap in RandomApply."""

    def __init__(self, threshold: int = 128):
        self.threshold = threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold)

    def __repr__(self) -> str:
        return f"Solarize(threshold={self.threshold})"


class TwoCrops:
    """Two views of one image: [first(img), second(img)]. With one pipeline, both views use it (MoCo)."""

    def __init__(self, first, second=None):
        self.first, self.second = first, (second if second is not None else first)

    def __call__(self, img):
        return [self.first(img), self.second(img)]


class MultiCrop:
    """Several views of one image, one per pipeline, in the given order (e.g. AdCo: 1 key + 5 query crops)."""

    def __init__(self, pipelines):
        self.pipelines = list(pipelines)

    def __call__(self, img):
        return [p(img) for p in self.pipelines]


def eval_transform(image_size: int) -> T.Compose:
    """Resize the short side, centre-crop `size`, normalise. The resize is size*256/224 (ImageNet: 256 -> 224)
    above 64 px; small images (size <= 64, e.g. 32 px CIFAR) are resized to `size` and used whole, as CIFAR
    kNN monitors do (MoCo's CIFAR-10 demo, lightly): 32 -> 36 -> 32 would drop a fifth of the pixels."""
    return T.Compose([
        T.Resize(image_size if image_size <= 64 else int(round(image_size * 256 / 224))),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------------------------------------
# Views: one description per augmented view, run by either executor (PIL in workers, or batched on the device)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """One view's augmentation, always in this order (MoCo v2 / BYOL):
        RandomResizedCrop(size, scale, ratio) -> ColorJitter(*jitter) with prob. jitter_p -> grayscale with prob.
        gray_p -> Gaussian blur, sigma ~ U[blur_sigma], with prob. blur_p -> solarize (>= 128) with prob.
        solarize_p -> horizontal flip with prob. flip_p -> normalise (ImageNet mean and std)
    The values are set in each method file; this class only names them. `pil_pipeline` and `DeviceAugment`
    both read the same View, so the two paths cannot drift apart."""
    size: int                                  # output side, pixels
    scale: tuple[float, float]                 # RandomResizedCrop area fraction range
    jitter: tuple[float, float, float, float]  # ColorJitter brightness, contrast, saturation, hue
    jitter_p: float
    gray_p: float
    blur_p: float                              # 0: no blur (the PIL pipeline then has no blur operator at all)
    blur_sigma: tuple[float, float]
    solarize_p: float                          # 0: no solarize operator
    flip_p: float
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range: torchvision's default, all papers


def pil_pipeline(view: View) -> T.Compose:
    """The worker-side (PIL) pipeline of one view: torchvision's transforms plus GaussianBlur/Solarize above."""
    ops = [T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio)]
    if view.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p))
    if view.gray_p > 0:
        ops.append(T.RandomGrayscale(p=view.gray_p))
    if view.blur_p > 0:
        ops.append(T.RandomApply([GaussianBlur(*view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(T.RandomApply([Solarize(128)], p=view.solarize_p))
    ops.append(T.RandomHorizontalFlip(p=view.flip_p))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pil_views(views: list) -> "MultiCrop":
    """The worker-side transform of a list of views: one PIL image -> [view tensors], in order."""
    return MultiCrop([pil_pipeline(view) for view in views])


# ---------------------------------------------------------------------------------------------------
# The device executor: the same operators, batched, with per-sample random parameters, on float images in [0, 1].
# Each operator follows torchvision's tensor semantics (tests/test_augment.py compares them with torchvision).
# Random numbers come from the default generator of the images' device, which every checkpoint saves per rank.
# ---------------------------------------------------------------------------------------------------
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's luma weights (ITU-R 601-2) for float tensors


def uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def sample_crops(heights: torch.Tensor, widths: torch.Tensor, scale, ratio) -> tuple:
    """RandomResizedCrop's sampler for every sample at once -> (top, left, height, width), float [N] each.

    As torchvision: up to 10 tries of area ~ U[scale] x image area and log aspect ~ U[log ratio]; side lengths
    are rounded (half to even, like Python's round); the first try that fits the image wins, and its corner is
    uniform over the valid positions. When no try fits, the whole image is taken, cut to the nearest allowed
    aspect ratio and centred. heights, widths: [N] image sizes (float)."""
    n, device = heights.shape[0], heights.device
    area = (heights * widths)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, device=device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 10, device=device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    found = fits.any(dim=1)
    # the fallback: the largest centred crop with an aspect ratio inside `ratio`
    in_ratio = widths / heights
    fb_w = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    w = torch.where(found, w.gather(1, first).squeeze(1), fb_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fb_h)
    top = torch.where(found, torch.floor(torch.rand(n, device=device) * (heights - h + 1)),
                      torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(torch.rand(n, device=device) * (widths - w + 1)),
                       torch.floor((widths - w) / 2))
    return top, left, h, w


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[N, out_size, in_size] rows that resample pixels [start, start + length) of a line to out_size pixels.

    This is PIL's (and torchvision's antialiased) bilinear resize: output pixel x is centred at
    c = start + (x + 0.5) * length / out_size and averages the input pixels j of the crop with triangle weights
    max(0, 1 - |j + 0.5 - c| / s), normalised to sum 1, where s = max(1, length / out_size): when shrinking, the
    triangle widens to cover every input pixel (anti-aliasing); when enlarging it is plain linear interpolation."""
    step = (length / out_size)[:, None, None]  # input pixels per output pixel
    centre = start[:, None, None] + (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * step
    pos = (torch.arange(in_size, device=start.device) + 0.5)[None, None, :]  # input pixel centres
    weights = (1 - (pos - centre).abs() / step.clamp(min=1)).clamp(min=0)
    inside = (pos > start[:, None, None]) & (pos < (start + length)[:, None, None])  # the crop only
    weights = weights * inside
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(images: torch.Tensor, top, left, h, w, size: int) -> torch.Tensor:
    """Crop box (top, left, h, w) of each image, resized to size x size: out = Wy @ image @ Wxᵀ per channel.
    images: [N, 3, H, W] float; the box values are [N] float tensors (no host sync)."""
    wy = resample_weights(top, h, images.shape[2], size)   # [N, size, H]
    wx = resample_weights(left, w, images.shape[3], size)  # [N, size, W]
    return wy[:, None] @ images @ wx.transpose(1, 2)[:, None]  # [N, 3, size, size]


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast one value per sample over an image batch."""
    return x[:, None, None, None]


def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, clamped to [0, 1] (torchvision's blend; factor [N])."""
    factor = per_sample(factor)
    return (factor * a + (1.0 - factor) * b).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images [N, 3, H, W]."""
    return (GRAY_WEIGHTS[0] * x[:, 0] + GRAY_WEIGHTS[1] * x[:, 1] + GRAY_WEIGHTS[2] * x[:, 2]).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image by shift [N] (in turns, within [-0.5, 0.5]); saturation and value kept.

    RGB -> HSV: v = max, c = max - min, s = c / v, h = (sector offset + signed distance) / 6 mod 1, where the
    sector is the channel holding the max (r: (g - b) / c, g: 2 + (b - r) / c, b: 4 + (r - g) / c).
    HSV -> RGB: channel n (r: 5, g: 3, b: 1) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6."""
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1)
    c = v - x.amin(dim=1)
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    hue = torch.where(v == r, (g - b) / safe_c, torch.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    hue = torch.where(c > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue / 6.0 + shift[:, None, None], 1.0)
    sat = c / torch.where(v > 0, v, torch.ones_like(v))
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * hue, 6.0)
        out.append(v - v * sat * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(out, dim=1)


def jitter_blend(x: torch.Tensor, factors: torch.Tensor, op: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One blend of ColorJitter for the samples `active` [N] (the others come back unchanged): each blends its image
    by its factor (factors [N, 4]) with the target of its operation op [N] (0 brightness: black; 1 contrast: the
    image's mean luma; 2 saturation: its luma)."""
    luma = grayscale(x)
    target = torch.where(per_sample(op == 0), torch.zeros_like(luma),
                         torch.where(per_sample(op == 1), luma.mean(dim=(1, 2, 3), keepdim=True), luma))
    return torch.where(per_sample(active), blend(x, target, factors.gather(1, op[:, None]).squeeze(1)), x)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors [N, 4] (brightness, contrast, saturation, hue) applied in a per-sample
    order [N, 4] (a permutation of 0..3), as torchvision does for each image. Three operations are blends
    (jitter_blend); the hue rotation is the costly one (an HSV round trip), so it runs once, on the whole batch:
    each sample first makes the blends its order puts before its hue (batched steps 0-2, each sample at its
    own), then the rotation, then the blends after it (steps 1-3). A factor of 1 (0 for hue) changes nothing."""
    hue_step = order.argmax(dim=1)  # the position of operation 3 (hue) in each sample's order
    for step in range(3):
        x = jitter_blend(x, factors, order[:, step], step < hue_step)
    x = shift_hue(x, factors[:, 3])
    for step in range(1, 4):
        x = jitter_blend(x, factors, order[:, step], step > hue_step)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, half: int) -> torch.Tensor:
    """Separable Gaussian blur with each sample's own sigma [N] and 2 half + 1 taps exp(-t² / 2σ²), normalised
    to sum 1. Beyond its borders the image is mirrored about its edges (c b a | a b c: torchvision's
    padding_mode="symmetric"), which comes closest to PIL's blur, three box passes that each repeat the edge
    pixel (docs/augment.md, "Blur at the borders"). Equals torchvision's gaussian_blur with that kernel size of
    the image padded so by `half` pixels, per sample."""
    n, c, height, width = x.shape
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*3, taps]

    def mirrored(size: int) -> torch.Tensor:  # the pixel that each padded position copies: -1 -> 0, -2 -> 1, ...
        i = torch.arange(-half, size + half, device=x.device) % (2 * size)
        return torch.where(i < size, i, 2 * size - 1 - i)
    y = x.reshape(1, n * c, height, width)[:, :, mirrored(height)][:, :, :, mirrored(width)]
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along rows
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)  # along columns
    return y.reshape(n, c, height, width)


def blur_half_width(view: View) -> int:
    """Kernel half-width: 3 sigma_max (the Gaussian beyond holds 0.3 % of its mass)."""
    return math.ceil(3 * view.blur_sigma[1])


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Inverts every value >= 128/255 (PIL's ImageOps.solarize(img, 128) on [0, 1] floats)."""
    return torch.where(x >= 128 / 255, 1.0 - x, x)


def draw_params(view: View, heights: torch.Tensor, widths: torch.Tensor) -> dict:
    """Every random choice of one view for N images of sizes heights, widths ([N] float, on the device), drawn
    at once from the device's default generator: the crop boxes, which operators apply (bool [N] each), the
    jitter factors [N, 4] and orders [N, 4], and the blur sigmas [N]."""
    n, device = heights.shape[0], heights.device
    top, left, h, w = sample_crops(heights, widths, view.scale, view.ratio)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, device=device) < p

    jitter = [(max(0.0, 1 - j), 1 + j) for j in view.jitter[:3]] + [(-view.jitter[3], view.jitter[3])]
    return {"top": top, "left": left, "height": h, "width": w,
            "jitter": coin(view.jitter_p),
            "factors": torch.stack([uniform(n, lo, hi, device) for lo, hi in jitter], dim=1),
            "order": torch.rand(n, 4, device=device).argsort(dim=1),  # a uniform random permutation per sample
            "gray": coin(view.gray_p), "blur": coin(view.blur_p),
            "sigma": uniform(n, view.blur_sigma[0], view.blur_sigma[1], device),
            "solarize": coin(view.solarize_p), "flip": coin(view.flip_p)}


def apply_view(x: torch.Tensor, view: View, params: dict) -> torch.Tensor:
    """The operators after the crop, on float images [N, 3, size, size] in [0, 1], with the drawn params;
    returns the normalised view. An operator whose probability is 0 is skipped (its draws are unused)."""
    if view.jitter_p > 0:
        x = torch.where(per_sample(params["jitter"]), color_jitter(x, params["factors"], params["order"]), x)
    if view.gray_p > 0:
        x = torch.where(per_sample(params["gray"]), grayscale(x).expand_as(x), x)
    if view.blur_p > 0:
        x = torch.where(per_sample(params["blur"]), gaussian_blur(x, params["sigma"], blur_half_width(view)), x)
    if view.solarize_p > 0:
        x = torch.where(per_sample(params["solarize"]), solarize(x), x)
    x = torch.where(per_sample(params["flip"]), x.flip(3), x)
    # per channel with Python numbers: a mean/std tensor would be a host-to-device copy (a sync) every step
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A tensor of Python numbers on `device`. To a GPU through pinned memory and non_blocking, so the host does
    not wait for the GPU's queue of work (a plain copy from pageable memory would)."""
    tensor = torch.tensor(values)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceAugment:
    """Runs a list of Views on a batch of uint8 images, on the images' device -> [normalised float32 views].

    Same operators, order, probabilities and parameter distributions as `pil_pipeline`, each sample's
    parameters drawn independently. Differences from the PIL path (measured in tests/test_augment.py, listed
    in docs/augment.md): values stay float between operators (PIL rounds to uint8 after each), the luma
    weights are torchvision's tensor ones (0.2989, 0.587, 0.114; PIL: 0.299, 0.587, 0.114), and the blur is an
    exact Gaussian where PIL approximates one with box filters."""

    def __init__(self, views: list):
        self.views = list(views)

    def __call__(self, images) -> list:
        """images: uint8 [N, 3, H, W], or a list of uint8 [3, H_i, W_i] (decoded files of different sizes)."""
        # to float in [0, 1] once for all the views
        images = images.float() / 255 if torch.is_tensor(images) else [image.float() / 255 for image in images]
        return [self.view(images, view) for view in self.views]

    def view(self, images, view: View) -> torch.Tensor:
        """One view of float images in [0, 1] (a batch tensor, or a list of differently sized images)."""
        if torch.is_tensor(images):  # sizes made on the device (no copy from the host, no sync)
            device, n = images.device, images.shape[0]
            heights = torch.full((n,), float(images.shape[2]), device=device)
            widths = torch.full((n,), float(images.shape[3]), device=device)
        else:
            device, n = images[0].device, len(images)
            heights, widths = to_device([[float(im.shape[1]) for im in images],
                                         [float(im.shape[2]) for im in images]], device)
        p = draw_params(view, heights, widths)
        if torch.is_tensor(images):
            x = resized_crop(images, p["top"], p["left"], p["height"], p["width"], view.size)
        else:  # images of one size are cropped together; the results go back to their places in the batch
            x = torch.empty(n, 3, view.size, view.size, device=device)
            groups = {}
            for i, image in enumerate(images):
                groups.setdefault(tuple(image.shape), []).append(i)
            for members in groups.values():
                index = to_device(members, device)
                batch = torch.stack([images[i] for i in members])
                x[index] = resized_crop(batch, *(p[key][index] for key in ("top", "left", "height", "width")),
                                        view.size)
        return apply_view(x, view, p)


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------
class SyntheticImages(Dataset):
    """A small deterministic labelled fake dataset: image i depends only on (seed, i).

    Each class has its own smooth colour pattern; an image is its class pattern, randomly shifted, plus
    noise. So features can separate classes (kNN and linear probes have signal), nothing is downloaded,
    and two processes see identical images. Images are PIL RGB so the real augmentation pipelines apply.
    """

    def __init__(self, num_images: int, image_size: int, num_classes: int = 10, seed: int = 0, transform=None):
        self.num_images, self.image_size, self.transform = num_images, image_size, transform
        self.classes = [f"class{c}" for c in range(num_classes)]
        self.seed = seed
        g = torch.Generator().manual_seed(12345)  # the class patterns are the same for every split
        low = torch.rand(num_classes, 3, 4, 4, generator=g)  # a 4x4 colour layout per class, upsampled
        self.patterns = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        pil = self.render(index)
        return (self.transform(pil) if self.transform is not None else pil), index % len(self.classes)

    def render(self, index: int) -> Image.Image:
        """Image `index` as PIL RGB, before any transform."""
        label = index % len(self.classes)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shift = torch.randint(-self.image_size // 4, self.image_size // 4 + 1, (2,), generator=g)
        img = torch.roll(self.patterns[label], shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
        img = (img + 0.15 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        return Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def _checked_pil_loader(path: str) -> Image.Image:
    """ImageFolder's loader, but a corrupt or unreadable file names itself instead of a bare PIL error."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the damage
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


# --dataset NAME -> (torchvision class, the folder its files unpack into under --data)
TORCHVISION_SETS = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python"),
                    "stl10": ("STL10", "stl10_binary")}


def _torchvision_set(kind: str, root: Optional[str], split: str, transform) -> Dataset:
    """torchvision's CIFAR-10 / CIFAR-100 / STL-10 (labelled train split; val = test split) under `root`.
    Missing files are downloaded by ONE process (global rank 0) while the others wait; every rank takes part
    in the decision, so no rank can wait alone. Without network: one line saying where the files go."""
    class_name, folder = TORCHVISION_SETS[kind]
    if not root:
        raise UserError(f"--dataset {kind} needs --data ROOT: the folder that holds (or will receive) {folder}/")
    cls = getattr(torchvision.datasets, class_name)
    kwargs = {"split": "train" if split == "train" else "test"} if kind == "stl10" else {"train": split == "train"}

    def load(download: bool):
        return cls(root, transform=transform, download=download, **kwargs)

    try:
        dataset = load(False)
    except (RuntimeError, OSError, EOFError, ValueError):  # "Dataset not found or corrupted", a missing file
        dataset = None
    distributed = dist.is_available() and dist.is_initialized()

    def everyone(value) -> list:  # every rank's value (one collective); [value] in one process
        if not distributed:
            return [value]
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    if not any(everyone(dataset is None)):
        return dataset
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            load(True)
        except Exception as e:  # noqa: BLE001 (no network, a full disk, a refused folder, ...)
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    error = everyone(error)[0]  # rank 0's outcome, on every rank
    if error is not None:
        raise UserError(f"--dataset {kind}: no {folder}/ under {root} and the download failed ({error}); "
                        f"download it elsewhere with torchvision.datasets.{class_name}(ROOT, download=True) and "
                        f"copy ROOT/{folder} to {root}/")
    return load(False)


def make_dataset(kind: str, data: str | None, split: str, transform, synthetic_images: int = 256,
                 image_size: int = 224, seed: int = 0) -> Dataset:
    """`split` is "train" or "val". imagefolder: <data>/train/<class>/*.jpg and <data>/val (or test)/...;
    cifar10, cifar100, stl10: torchvision's dataset files under <data> (val = their test split), downloaded
    there on first use; synthetic: SyntheticImages. Every failure is a UserError naming the path."""
    if kind == "synthetic":
        n = synthetic_images if split == "train" else max(synthetic_images // 4, 10)
        # different seeds -> the val images are different images of the same classes
        return SyntheticImages(n, image_size, seed=seed if split == "train" else seed + 1, transform=transform)
    if kind in TORCHVISION_SETS:
        return _torchvision_set(kind, data, split, transform)
    if kind != "imagefolder":
        raise UserError(f"unknown --dataset {kind!r} (use imagefolder, {', '.join(TORCHVISION_SETS)} or synthetic)")
    if not data:
        raise UserError("--dataset imagefolder needs --data /path/to/root with train/ and val/ (or test/) "
                        "class folders; use --dataset synthetic for a smoke run")
    if not os.path.isdir(data):
        raise UserError(f"data folder {data} does not exist")
    names = ["train"] if split == "train" else ["val", "test"]
    folder = next((os.path.join(data, n) for n in names if os.path.isdir(os.path.join(data, n))), None)
    if folder is None:
        raise UserError(f"data folder {data} has no {' or '.join(n + '/' for n in names)} sub-folder")
    try:
        return torchvision.datasets.ImageFolder(folder, transform=transform, loader=_checked_pil_loader)
    except FileNotFoundError as e:  # "Couldn't find any class folder" / "Found no valid file for the classes"
        raise UserError(f"{folder}: {e}") from None


def _class_names(dataset) -> Optional[list]:
    """The class-name list behind `dataset`, looking through Subset wrappers; None if it has none."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return None if names is None else [str(name) for name in names]


def check_same_classes(train_set, val_set, where: str) -> None:
    """Refuses (UserError) a val split whose class names differ from train's, in content or in order.

    Labels are positions in the class list (ImageFolder numbers the sorted folder names), so one class folder
    missing or renamed in val shifts every later label and the accuracy is silently wrong; comparing only the
    number of classes misses a rename. Datasets without a class list on both sides (STL-10 without
    class_names.txt) cannot be compared and pass.
    """
    train_names, val_names = _class_names(train_set), _class_names(val_set)
    if train_names is None and val_names is None:
        return
    if train_names is None or val_names is None:
        side = "train" if train_names is None else "val"
        raise UserError(f"{where}: the {side} split has no class-name list to compare with the other split's")
    if train_names == val_names:
        return

    def some(names: list) -> str:  # ImageNet has 1000 classes: a wrong split must not print them all
        return repr(names[:5])[:-1] + f", ... ({len(names)} in all)]" if len(names) > 5 else repr(names)

    in_train, in_val = set(train_names), set(val_names)
    missing = [name for name in train_names if name not in in_val]
    extra = [name for name in val_names if name not in in_train]
    if missing or extra:
        detail = ", ".join(part for part in (f"missing in val {some(missing)}" if missing else "",
                                             f"only in val {some(extra)}" if extra else "") if part)
    elif len(train_names) != len(val_names):  # same names, one listed twice
        detail = f"same names but {len(train_names)} entries in train and {len(val_names)} in val"
    else:
        i = next(i for i, (a, b) in enumerate(zip(train_names, val_names)) if a != b)
        detail = (f"same names in another order (label {i} is {train_names[i]!r} in train but "
                  f"{val_names[i]!r} in val)")
    raise UserError(f"{where}: val classes differ from train's: {detail}; labels are positions in the class "
                    f"list, so every accuracy would be wrong")


# ---------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (drop_last=True) whose epoch can start at batch `start_batch`.

    The order of an epoch depends only on (seed, epoch), never on how many times the run was resumed, so
    resuming from a mid-epoch checkpoint continues with exactly the batches the interrupted run had not
    yet seen. Works with one process (num_replicas=1) without a process group.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, batch_per_rank: int, seed: int, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_per_rank, self.start_batch = batch_per_rank, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())
        usable = len(indices) // self.batch_per_rank * self.batch_per_rank  # whole batches only
        return iter(indices[self.start_batch * self.batch_per_rank: usable])

    def __len__(self) -> int:
        return (self.num_samples // self.batch_per_rank - self.start_batch) * self.batch_per_rank


def make_loader(dataset, batch_per_rank: int, rank: int, world: int, workers: int, seed: int,
                shuffle: bool = True, pin_memory: bool = True, device_views: Optional[list] = None,
                device: Optional[torch.device] = None, collate_fn=None):
    """Training loader: ResumableSampler (call `loader.sampler.set_epoch(e)` every epoch), drop_last,
    pinned memory, persistent workers, prefetch 4 batches per worker, torch's collate unless `collate_fn`.
    With `device_views` (--augment-on device): a DeviceLoader that augments those views on `device` instead.

    The loader gets its own generator so creating an iterator does not consume the global torch RNG:
    with workers=0 a resumed run then draws exactly the augmentations of an uninterrupted one.
    """
    if len(dataset) < batch_per_rank * world:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                        f"({batch_per_rank * world}); lower --batch-size")
    if device_views is not None:
        return DeviceLoader(dataset, device_views, batch_per_rank, rank, world, workers, seed, device)
    sampler = ResumableSampler(dataset, world, rank, batch_per_rank, seed, shuffle)
    return DataLoader(
        dataset, batch_size=batch_per_rank, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed + rank),
        worker_init_fn=ignore_stop_signals, collate_fn=collate_fn,
    )


class EncodedFiles(Dataset):
    """An ImageFolder's files as raw bytes (uint8 1-D tensors) with their labels: what workers do when decoding
    happens on the device (--augment-on device with --dataset imagefolder)."""

    def __init__(self, folder):
        self.samples = folder.samples  # [(path, label)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return torchvision.io.read_file(path), label, path
        except Exception as e:  # noqa: BLE001 (unreadable file: name it)
            raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def pack_files(batch: list) -> tuple:
    """collate_fn for EncodedFiles, run in the worker: the batch's files as ONE uint8 tensor (their bytes one after
    the other) with their lengths, labels and paths. One tensor crosses to the main process per batch (each file
    its own tensor would cost ~10x more in shared-memory set-up); a tensor straight from read_file cannot be
    sent at all (its storage is not shareable: the worker fails and the loader waits forever)."""
    data, labels, paths = zip(*batch)
    return torch.cat(data), torch.tensor([d.numel() for d in data]), torch.tensor(labels), list(paths)


def decode_images(data: list, paths: list, device: torch.device) -> list:
    """Decodes a batch of encoded files to RGB uint8 [3, H_i, W_i] on `device`. JPEGs are decoded as one batch
    by torchvision.io.decode_jpeg (nvjpeg on CUDA); other formats (PNG, ...) by decode_image on the CPU. A file
    that cannot be decoded is named in a UserError."""
    rgb = torchvision.io.ImageReadMode.RGB
    is_jpeg = [d.numel() > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in data]
    out = [None] * len(data)
    jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
    try:
        if jpegs:
            decoded = torchvision.io.decode_jpeg([data[i] for i in jpegs], mode=rgb, device=device)
            for i, image in zip(jpegs, decoded):
                out[i] = image
        for i, flag in enumerate(is_jpeg):
            if not flag:
                out[i] = torchvision.io.decode_image(data[i], mode=rgb).to(device, non_blocking=True)
    except Exception:  # noqa: BLE001 (a batch failed: find the file, one by one, and name it)
        for d, path in zip(data, paths):
            try:
                torchvision.io.decode_image(d, mode=rgb)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        raise
    return out


def images_in_memory(dataset) -> Optional[tuple]:
    """(uint8 images [N, 3, H, W], labels [N]) of a dataset held in memory: torchvision's CIFAR-10/100 and STL-10,
    SyntheticImages, or a TensorDataset(uint8 images, labels); None for an ImageFolder (files on disk)."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100)):  # data [N, H, W, 3]
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)
    if isinstance(dataset, torchvision.datasets.STL10):  # data [N, 3, H, W]
        return torch.from_numpy(dataset.data).contiguous(), torch.from_numpy(dataset.labels).long()
    if isinstance(dataset, SyntheticImages):
        images = [T.functional.pil_to_tensor(dataset.render(i)) for i in range(len(dataset))]
        return torch.stack(images), torch.tensor([i % len(dataset.classes) for i in range(len(dataset))])
    return None


class DeviceLoader:
    """Training batches augmented on the training device (--augment-on device): yields ([views], labels) like the
    PIL path's DataLoader, with the same ResumableSampler (same order, same mid-epoch restart).

    In-memory datasets (CIFAR, STL-10, synthetic) live on the device as one uint8 tensor and batches are indexed
    there: no worker processes, no copies per step. ImageFolder: `workers` processes only read files; decoding
    (nvjpeg on CUDA, one batch ahead in a thread) and augmentation happen on the device."""

    def __init__(self, dataset, views: list, batch_per_rank: int, rank: int, world: int, workers: int, seed: int,
                 device: torch.device):
        self.augment, self.device, self.batch = DeviceAugment(views), device, batch_per_rank
        held = images_in_memory(dataset)
        self.files = None
        if held is not None:
            self.sampler = ResumableSampler(dataset, world, rank, batch_per_rank, seed)
            self.images, self.labels = held[0].to(device), held[1].to(device)
        else:  # the PIL path's loader, over the files' bytes
            self.files = make_loader(EncodedFiles(dataset), batch_per_rank, rank, world, workers, seed,
                                     pin_memory=device.type == "cuda", collate_fn=pack_files)
            self.sampler = self.files.sampler

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self):
        if self.files is not None:
            # A thread decodes batch i + 1 while batch i trains (the decoders release the GIL). Decoding draws no
            # random number; the augmentation's draws stay in this thread, in batch order, so a seeded run repeats.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
                ahead = None  # (decoded images in the making, labels) of the next batch
                for packed, lengths, labels, paths in self.files:
                    data = list(torch.split(packed, lengths.tolist()))  # one 1-D uint8 tensor per file
                    job = (pool.submit(decode_images, data, paths, self.device), labels)
                    if ahead is not None:
                        yield self.augment(ahead[0].result()), ahead[1].to(self.device, non_blocking=True)
                    ahead = job
                if ahead is not None:
                    yield self.augment(ahead[0].result()), ahead[1].to(self.device, non_blocking=True)
            return
        order = to_device(list(self.sampler), self.device)  # this epoch's indices, one copy per epoch
        for start in range(0, order.numel(), self.batch):
            index = order[start:start + self.batch]
            yield self.augment(self.images[index]), self.labels[index]


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers outlive the stop signals meant for the training process. SLURM and a terminal signal
    every process of the job, and a worker killed by one makes the training process raise at once (torch's
    SIGCHLD handler), before it can stop gracefully. So workers ignore SIGINT and SIGUSR1, and obey SIGTERM
    only from their parent (how the DataLoader and multiprocessing end them): a thread waits for SIGTERM and
    reads its sender."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered to sigwaitinfo below, not by default

    def obey_parent_only():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)
    threading.Thread(target=obey_parent_only, daemon=True, name="sigterm-from-parent").start()


# ---------------------------------------------------------------------------------------------------
# kNN classifier (InstDisc weighted vote, as MoCo's and CaCo's kNN monitors)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                     autocast=None, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised backbone features and labels of the *whole* dataset, in dataset order, on every rank.
    on_batch(images) is called after each batch (a progress bar; every rank calls it equally often).

    Rank r embeds images r, r+R, r+2R, ... (the index list is padded to a multiple of R so that
    all_gather sees equal shapes); the gathered result is re-interleaved and the padding dropped, so no
    image is counted twice. The caller puts the network in eval mode. Features are fp32.

    With several processes the ranks decide together: if the local pass fails on any rank (an unreadable
    image, out of memory), EVERY rank raises the same kind of error, "kNN feature extraction failed on rank r:
    ...", a UserError when the cause was one (a corrupt file) and a RuntimeError otherwise, and no rank is left
    waiting in the gather. With one process the original exception propagates unchanged.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(dataset)
    padded = list(range(n)) + list(range((-n) % world))  # repeat a few images so n_padded % world == 0
    mine = padded[rank::world]
    failure = None
    try:
        loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, shuffle=False,
                            num_workers=workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator(),  # own generator: leaves the global RNG stream untouched
                            worker_init_fn=ignore_stop_signals)
        feats, labels = [], []
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if autocast is not None:
                with autocast():
                    out = backbone(images)
            else:
                out = backbone(images)
            feats.append(F.normalize(out.float(), dim=1))
            labels.append(targets.to(device))
            if on_batch is not None:
                on_batch(len(targets))
        feats, labels = torch.cat(feats), torch.cat(labels)
    except Exception as e:  # noqa: BLE001 (whatever it is, the other ranks must hear of it)
        if world == 1:
            raise
        failure = e
    if world > 1:
        # A rank that raised alone would leave the others blocked in all_gather forever, or pair their gather
        # with its next collective; so every rank first reports success or failure, and all decide alike.
        mine_report = None
        if failure is not None:
            # a DataLoader worker's exception arrives with the worker's traceback in its text; the last line is
            # "[module.]<type>: <message>", the part worth one line
            kind = type(failure).__name__
            lines = [line for line in str(failure).strip().splitlines() if line.strip()]
            message = lines[-1].split(f"{kind}: ", 1)[-1] if lines else ""
            mine_report = (isinstance(failure, UserError), f"{kind}: {message}")
        reports = [None] * world
        dist.all_gather_object(reports, mine_report)
        failed = [r for r, report in enumerate(reports) if report is not None]
        if failed:
            is_user, message = reports[failed[0]]
            others = f" (and on {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            error = (UserError if is_user else RuntimeError)(
                f"kNN feature extraction failed on rank {failed[0]}{others}: {message}")
            raise error from failure
        # gathered[w][j] is image padded[w + j * world]
        all_feats = [torch.empty_like(feats) for _ in range(world)]
        all_labels = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_feats, feats)
        dist.all_gather(all_labels, labels)
        feats = torch.stack(all_feats, dim=1).flatten(0, 1)[:n]
        labels = torch.stack(all_labels, dim=1).flatten(0, 1)[:n]
    return feats, labels


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores S_c(z) = sum over the k most similar train features z_j of exp(z.z_j / t) [y_j = c].

    All features are unit rows (cosine similarity). train_feats [M, C], test_feats [Q, C] -> scores [Q, classes].
    k is capped at M. Computed in fp32, in chunks of test rows to bound memory.
    """
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk].float() @ train_feats.float().T  # [q, M]
        top_sim, top_idx = sim.topk(k, dim=1)  # [q, k]
        weights = (top_sim / t).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # [q, k, classes]
        scores.append((weights.unsqueeze(-1) * onehot).sum(dim=1))
    return torch.cat(scores)


def knn_accuracy(backbone: nn.Module, train_set, val_set, batch_size: int, device: torch.device,
                 k: int = 200, t: float = 0.1, workers: int = 0, autocast=None, on_batch=None) -> tuple[float, float]:
    """kNN top-1 / top-5 (percent) of `val_set`, using `train_set` (with the eval transform) as memory.

    Switches the backbone to eval mode for the extraction and restores its previous mode afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        train_feats, train_labels = extract_features(backbone, train_set, batch_size, device, workers, autocast,
                                                     on_batch)
        val_feats, val_labels = extract_features(backbone, val_set, batch_size, device, workers, autocast, on_batch)
    finally:
        backbone.train(was_training)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, val_feats, num_classes, k, t)
    top5 = scores.topk(min(5, num_classes), dim=1).indices
    top1_acc = (top5[:, 0] == val_labels).float().mean().item() * 100
    top5_acc = (top5 == val_labels[:, None]).any(dim=1).float().mean().item() * 100
    return top1_acc, top5_acc
