"""Images for the models that see them: decoded once, kept as uint8, augmented and normalised a batch at a time.

Every image is decoded when the data is read, so a missing or unreadable file stops the run before training
with its row named. The decoded pixels (resized so the shorter side is the model's size, centre-cropped to a
square) stay in memory while they fit in CACHE_BYTES; past that, an image keeps its path and is decoded again
whenever a batch needs it. Augmentation runs on the whole batch at once: one affine grid per image (a random
resized crop, a horizontal flip) sampled bilinearly, as torchvision's RandomResizedCrop + RandomHorizontalFlip
do one image at a time.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unitune.data.files import DataError, Row

CACHE_BYTES = 4 << 30  # decoded pixels kept in memory; beyond, images are decoded again for each batch
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_path(row: Row, images: str | None) -> Path:
    """The row's image file: `image` (or `path`), relative to data.images or else to the data file's folder."""
    key = next((k for k in ("image", "path", "file") if k in row.data), None)
    if key is None or not isinstance(row.data[key], str) or not row.data[key].strip():
        found = row.columns or f"{row.where}: has keys {sorted(row.data)}"
        raise DataError(f"{row.where}: no image path; image rows need 'image' (or 'path') and 'label' ({found})")
    path = Path(row.data[key].strip()).expanduser()
    if not path.is_absolute():
        path = (Path(images).expanduser() if images else row.file.parent if row.file else Path()) / path
    return path


@contextlib.contextmanager
def _opened(path: Path, where: str):
    """The image file opened with PIL; a missing or unreadable one is a DataError naming the row."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read image {path} ({err}); replace the file or drop the row") from None


def decode(path: Path, size: int, where: str, crop: bool = True) -> torch.Tensor:
    """The image as uint8 [3, size, size]: RGB, shorter side resized to `size`, centre-cropped (`crop`: else
    the whole image, [3, h, w] with min(h, w) = size, as a detector sees it)."""
    from PIL import Image

    with _opened(path, where) as img:
        img = img.convert("RGB")
    img = img.resize(resized(*img.size, size), Image.Resampling.BILINEAR)
    if crop:
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def resized(w: int, h: int, size: int) -> tuple[int, int]:
    """The (width, height) an image of w x h is resized to: its shorter side at `size`."""
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def file_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with _opened(path, where) as img:
        return img.size


@dataclass
class ImageProcessor:
    """What an image model's inputs are: their size, normalisation and training augmentation. It takes a
    tokenizer's place in the pipeline (`pad_token_id`, `chat_template` and `save_pretrained` are there for
    the code that handles either)."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: list[str] = field(default_factory=lambda: ["crop", "flip"])
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop: bool = True  # centre-crop to a square; False for detection: whole images, boxes scaled with them
    cached_bytes: int = field(default=0, repr=False, compare=False)

    pad_token_id = 0
    chat_template = None

    def load(self, row: Row, images: str | None) -> torch.Tensor | Path:
        """The row's image decoded (an error names the row), kept as pixels while the cache has room."""
        path = image_path(row, images)
        pixels = decode(path, self.size, row.where, self.crop)
        if self.cached_bytes + pixels.numel() > CACHE_BYTES:
            return path
        self.cached_bytes += pixels.numel()
        return pixels

    def pixels(self, images: list[torch.Tensor | Path]) -> torch.Tensor:
        return torch.stack([self.decoded(im) for im in images])

    def decoded(self, image: torch.Tensor | Path) -> torch.Tensor:
        return image if torch.is_tensor(image) else decode(image, self.size, str(image), self.crop)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std).view(1, -1, 1, 1) * 255
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    def train(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch as the model trains on it: augmented (one random crop and flip per image), normalised."""
        x = batch.float()
        if self.augment:
            n = x.shape[0]
            theta = torch.zeros(n, 2, 3)
            w = h = torch.ones(n)
            if "crop" in self.augment:  # area fraction and aspect ratio as RandomResizedCrop draws them
                area = torch.empty(n).uniform_(*self.crop_scale)
                ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)))
                w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
            theta[:, 0, 0], theta[:, 1, 1] = w, h
            theta[:, 0, 2] = (torch.rand(n) * 2 - 1) * (1 - w)  # the crop's centre, inside the image
            theta[:, 1, 2] = (torch.rand(n) * 2 - 1) * (1 - h)
            if "flip" in self.augment:
                theta[:, 0, 0] *= torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self.normalize(x)

    def eval(self, batch: torch.Tensor) -> torch.Tensor:
        return self.normalize(batch)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "cached_bytes"}

    def save_pretrained(self, out: str | Path) -> None:
        (Path(out) / "preprocessor.json").write_text(json.dumps(self.to_dict(), indent=2))
