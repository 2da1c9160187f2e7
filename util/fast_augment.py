"""MAE's pre-training augmentation on uint8 tensors, to feed a GPU (--data_pipeline fast).

The reference is `util.datasets.build_transform(True, size, "pretrain")`: PIL decode, RandomResizedCrop(size,
scale=(0.2, 1), bicubic), RandomHorizontalFlip, ToTensor, Normalize. Here:
- the image file is read as bytes and, for a JPEG, decoded by libjpeg-turbo through `torchvision.io.decode_jpeg`,
  several times faster than PIL's decode of the same file, to exactly PIL's pixels (other formats go through PIL);
- the crop box and the flip are drawn by torchvision's own `RandomResizedCrop.get_params` and the same
  `torch.rand(1) < 0.5` as `RandomHorizontalFlip`, in the same order, so for one RNG state both paths crop the
  same box and flip alike (the laws are the same by construction, and so are the draws);
- the box is resized by torch's antialiased bicubic on uint8 (`F.interpolate(..., antialias=True)`), whose
  kernel is PIL's (a = -0.5, support scaled by the downscale factor);
- the sample stays uint8 (a quarter of float32's bytes through the workers' shared memory), and
  `normalize_on_device` turns the batch into ToTensor + Normalize's float32 values once it is on the device.
Pixels match the reference within the bound that tests/test_fast_augment.py checks.
"""
import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from torchvision.io import ImageReadMode

from util.datasets import BadImageError, load_rgb


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, decoded by the transform (the loader of --data_pipeline fast)."""

    path: str
    data: torch.Tensor  # uint8 bytes of the file


def read_encoded(path: str) -> EncodedImage:
    """The loader of --data_pipeline fast: the file's bytes; an unreadable file raises BadImageError naming it."""
    try:
        return EncodedImage(path, torchvision.io.read_file(path))
    except (OSError, RuntimeError) as err:
        raise BadImageError.for_file(path, err) from err


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (torchcodec >= 0.16, same API and the
# same pixels here, but wheels tied to one torch version); until torchvision drops them, they need no new dependency.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


def decode_rgb(image) -> torch.Tensor:
    """(3, H, W) uint8 from an EncodedImage or a PIL image. JPEG files (ImageNet's, where the time goes) are decoded
    by libjpeg-turbo through torchvision.io, to PIL's pixels exactly (a truncated file fails as under PIL; damaged
    scan data decodes as under PIL); other formats by PIL, since torchvision's PNG decoder crashes the process on
    a damaged zlib stream. A file that cannot be decoded raises BadImageError naming it (util.datasets.SkipBadImages
    replaces such samples)."""
    if isinstance(image, EncodedImage):
        if tuple(image.data[:3].tolist()) != JPEG_MAGIC:
            image = load_rgb(image.path, io.BytesIO(image.data.numpy().tobytes()))
        else:
            try:
                return torchvision.io.decode_jpeg(image.data, mode=ImageReadMode.RGB)
            except RuntimeError as err:  # torchvision's decoders report bad data as RuntimeError
                raise BadImageError.for_file(image.path, err) from err
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


class FastRandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio, bicubic) + RandomHorizontalFlip(0.5) -> (3, size, size) uint8."""

    reads_encoded = True  # util.datasets gives it an EncodedImage instead of a decoded PIL image, where it can

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, image) -> torch.Tensor:
        pixels = decode_rgb(image)
        top, left, height, width = transforms.RandomResizedCrop.get_params(pixels, list(self.scale), list(self.ratio))
        box = pixels[None, :, top:top + height, left:left + width]
        out = F.interpolate(box, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)[0]
        if torch.rand(1) < 0.5:
            out = out.flip(-1)
        return out.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, bicubic, uint8)"


def normalize_on_device(imgs: torch.Tensor, mean, std) -> torch.Tensor:
    """A uint8 batch (B, ..., 3, H, W) -> ToTensor + Normalize's float32 values, computed the same way (/255, then
    (x - mean) / std); a float batch passes through."""
    if imgs.dtype != torch.uint8:
        return imgs
    mean, std = _channel_stats(tuple(mean), tuple(std), imgs.device)
    return imgs.float().div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=8)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) mean and std on `device`, made once: a copy to the GPU at every step would block the host."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1) for v in (mean, std))

