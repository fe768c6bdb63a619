"""Turn decoded uint8 images (held on the training device) into network inputs.

Images are decoded once into one uint8 tensor; augmentation, resizing and normalisation then run
on the device batch by batch, so the GPU never waits for a CPU data loader.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dmuh.data.augmentations import AUGMENTATIONS  # noqa: F401 - also this module's API
from dmuh.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _per_channel(key: str, values, channels: int) -> tuple:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ConfigError(f"input {key} has {len(values)} values for {channels}-channel images", field="model_params")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, C) uint8 array -> (n, C, H, W) uint8 tensor; 2-D feature arrays pass as float32."""
    if images.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


class InputPipeline:
    """uint8 (B, C, H, W) -> normalised float (B, C, S, S) at the model's input size.

    `augment`: "none", "flip" (horizontal flip), "flip-crop" (flip plus a random crop of the
    image padded by 1/8 of its side, the standard CIFAR augmentation) or "simclr" (random resized
    crop of 20-100% of the area, flip, colour jitter, random grey: the views of self-supervised
    pre-training). Feature vectors (2-D input) pass through unchanged.

    `transform`: the network's input transform (`dmuh.models.network.input_transform`: mean, std in
    0..1 units, interpolation, crop_pct), the same in training, `dmuh encode`, `serve` and
    `export-onnx`. After augmentation the image is resized to floor(S / crop_pct) with that
    interpolation and its centre S x S kept (timm's and torchvision's eval transform; crop_pct 1:
    resized to S), then normalised. None: ImageNet statistics for 3 channels (0.5 and 0.5
    otherwise), bilinear, no crop. A 3-value mean or std on a 1-channel network is averaged (the
    gray image is the RGB copy the adapted first convolution sees).
    """

    def __init__(
        self,
        channels: Optional[int],
        input_size: Optional[int],
        augment: str = "none",
        transform: Optional[Dict[str, Any]] = None,
    ):
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment {augment!r}: choose one of {', '.join(AUGMENTATIONS)}", field="augment")
        self.channels = channels
        self.input_size = input_size
        self.augment = augment
        self.transform = dict(transform or {})
        count = channels or 1
        if channels == 3:
            default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            default_mean, default_std = (0.5,) * count, (0.5,) * count
        mean = _per_channel("mean", self.transform.get("mean") or default_mean, count)
        std = _per_channel("std", self.transform.get("std") or default_std, count)
        self.interpolation = self.transform.get("interpolation", "bilinear")
        self.crop_pct = float(self.transform.get("crop_pct", 1.0))
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255.0

    @classmethod
    def for_network(cls, network, augment: str = "none", channels: Optional[int] = None) -> "InputPipeline":
        """The pipeline of a hashing network (`HashNetwork`): its input size and recorded input
        transform; `channels` those of the data (default: the network's)."""
        return cls(
            channels if channels is not None else getattr(network, "in_channels", None),
            getattr(network, "input_size", None),
            augment,
            getattr(network, "input_transform", None),
        )

    def with_augment(self, augment: str) -> "InputPipeline":
        """This pipeline with another augmentation (the same size and transform)."""
        return InputPipeline(self.channels, self.input_size, augment, self.transform)

    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, train: bool = False
    ) -> torch.Tensor:
        if images.dim() == 2:  # feature vectors
            return images.float()
        x = images.float()
        if train and self.augment != "none":
            x = self._augment(x, generator)
        x = self._resize(x)
        if self.mean.device != x.device:  # moved once, not copied to the device every step
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        mean, std = self.mean, self.std
        return (x - mean) / std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if not size:
            return x
        # timm's scale size, floor(S / crop_pct) (the epsilon: 299 / (299 / 342) is 341.99...).
        scaled = int(math.floor(size / self.crop_pct + 1e-6)) if self.crop_pct < 1 else size
        if tuple(x.shape[-2:]) != (scaled, scaled):
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=(scaled, scaled), mode="nearest")
            else:
                x = F.interpolate(
                    x, size=(scaled, scaled), mode=self.interpolation, align_corners=False, antialias=False
                )
                if self.interpolation == "bicubic":  # overshoots at edges; a decoded image is 0..255
                    x = x.clamp(0.0, 255.0)
        if scaled != size:
            top = int(round((scaled - size) / 2.0))  # torchvision's CenterCrop
            x = x[..., top : top + size, top : top + size]
        return x

    def _augment(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.augment == "simclr":
            return simclr_view(x, generator)
        n, _, h, w = x.shape
        device = x.device
        flip = torch.rand(n, device=device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.augment == "flip-crop":
            pad = max(1, h // 8)
            padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
            dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
            rows = (dy[:, None] + torch.arange(h, device=device)[None])[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=device)[None])[:, None, None, :]
            batch = torch.arange(n, device=device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=device)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        return x


def simclr_view(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random SimCLR view per image of a float (B, C, H, W) batch in 0..255, on its device."""
    n, channels, h, w = x.shape
    device = x.device

    def uniform(low, high, size=(n,)):
        return low + (high - low) * torch.rand(size, device=device, generator=generator)

    # Random resized crop (area 0.2-1, aspect 3/4-4/3) and flip, as one affine resampling.
    area = uniform(0.2, 1.0)
    log_ratio = uniform(np.log(3 / 4), np.log(4 / 3))
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = uniform(-1.0, 1.0) * (1 - width)
    centre_y = uniform(-1.0, 1.0) * (1 - height)
    flip = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [n, channels, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if channels != 3:
        return x
    # Colour jitter with probability 0.8 (brightness, contrast, saturation 0.4), then grey with 0.2.
    luma_weights = torch.tensor([0.299, 0.587, 0.114], device=device)[None, :, None, None]

    def luma(images):
        return (images * luma_weights).sum(1, keepdim=True)

    def factor():
        return uniform(0.6, 1.4)[:, None, None, None]

    jitter = (torch.rand(n, device=device, generator=generator) < 0.8)[:, None, None, None]
    jittered = x * factor()  # brightness
    mean = luma(x).mean(dim=(2, 3), keepdim=True)
    jittered = (jittered - mean) * factor() + mean  # contrast
    grey = luma(jittered)
    jittered = (jittered - grey) * factor() + grey  # saturation
    x = torch.where(jitter, jittered.clamp(0, 255), x)
    to_grey = (torch.rand(n, device=device, generator=generator) < 0.2)[:, None, None, None]
    return torch.where(to_grey, luma(x).expand_as(x), x)
