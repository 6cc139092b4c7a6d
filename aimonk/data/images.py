"""Images: robust decoding of any file PIL reads into the uint8 tensors training and inference use."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aimonk import config
from aimonk.data.paths import open_regular_file, shown

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]



class ImageLoadError(ValueError):
    """An image could not be decoded; the message names the image and the reason."""



def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit is rescaled."""
    if getattr(img, "is_animated", False):
        img.seek(0)  # animated GIF/PNG: the first frame
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img



def load_image(source: ImageSource, name: str | None = None, draft_size: int | None = None) -> Image.Image:
    """Open an image as RGB, whatever its mode, with EXIF orientation applied.

    Args:
        source: a path, raw bytes, a binary file object or a PIL image.
        name: how to call the image in error messages (defaults to the path).
        draft_size: if given, JPEGs are decoded at reduced scale (never below this size) for speed.
    Returns:
        An RGB ``PIL.Image``.
    Raises:
        ImageLoadError: naming the image (escaped, see ``shown``), when it is missing, a broken
            symbolic link, unreadable (permission denied), not a regular file (a folder, a FIFO, a
            device: refused without blocking), empty, not an image, truncated, or larger than PIL's
            decompression-bomb limit.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = shown(name) if name else "<uploaded bytes>"
        if len(source) == 0:
            raise ImageLoadError(f"{label}: empty file (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), label, draft_size)
    if isinstance(source, (str, os.PathLike)):
        label = shown(name or source)
        with open_regular_file(source, ImageLoadError, label) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageLoadError(f"{label}: empty file (0 bytes)")
            return _decode(f, label, draft_size)
    return _decode(source, shown(name or str(getattr(source, "name", "<file object>"))), draft_size)


def _decode(fp, label: str, draft_size: int | None) -> Image.Image:
    """Decode an open image (bytes buffer or file) to RGB; every failure becomes an ``ImageLoadError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                # Explicit check as well: warning filters are process-global, so under the cache's
                # decoding threads the filter above is not guaranteed to be in force.
                limit = Image.MAX_IMAGE_PIXELS
                if limit and img.width * img.height > limit:
                    raise Image.DecompressionBombError(
                        f"Image size ({img.width * img.height} pixels) exceeds limit of {limit} pixels"
                    )
                if draft_size and img.format == "JPEG" and not getattr(img, "is_animated", False):
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(
            f"{label}: image too large ({e}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{label}: cannot decode image ({e})") from None



def image_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an RGB image to ``image_size`` x ``image_size`` (antialiased bilinear).

    Returns:
        A uint8 tensor of shape (3, image_size, image_size).
    """
    img = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()



def decode_uint8(source: ImageSource, image_size: int, name: str | None = None) -> torch.Tensor:
    """The one preprocessing path for training, the cache and inference: load, RGB, resize.

    Returns:
        A uint8 tensor of shape (3, image_size, image_size).
    """
    return image_to_uint8(load_image(source, name=name, draft_size=2 * image_size), image_size)



def normalize_batch(
    x: torch.Tensor,
    device: torch.device | str,
    mean: Sequence[float] = config.IMAGENET_MEAN,
    std: Sequence[float] = config.IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a uint8 batch (B, 3, H, W) to ``device`` and normalise it to float32."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x



def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, used for duplicate detection and as the cache key.

    Raises:
        ImageLoadError: if ``path`` is not a readable regular file (see ``open_regular_file``).
    """
    h = hashlib.sha256()
    with open_regular_file(path, ImageLoadError) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

