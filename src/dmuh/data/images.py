"""Image files to encode or search with: one file, a folder or .zip of files, or a list of paths.

`open_images(spec)` is what `dmuh encode --images` and `dmuh search --queries` read: unlabeled
files become an `ImageFiles`; class folders, labeled list files and the other data sources go to
`dmuh.data.open_source`. The image extensions and the hidden-file rule (dot-files, macOS
__MACOSX/ debris) are those of `dmuh.data.sources`.
"""

from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from dmuh.data.sources import IMAGE_EXTENSIONS, is_hidden, open_source
from dmuh.errors import DataError, DmuhError, first_line


def read_image(
    path,
    channels: int,
    size: Optional[int],
    data: Optional[bytes] = None,
    name: Optional[str] = None,
    max_pixels: Optional[int] = None,
) -> np.ndarray:
    """One image file (or its bytes) -> (size, size, channels) uint8; DmuhError naming it if unreadable.

    `max_pixels` refuses an image whose header declares more pixels before any is decoded (a
    decompression bomb: a few KB of PNG can declare gigabytes of pixels)."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(path)
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise DmuhError(f"{name}: {image.width} x {image.height} pixels, more than the {max_pixels:,} allowed")
        image.load()
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)  # as dmuh.data sources resize
    except FileNotFoundError:
        raise DmuhError(f"{name}: image not found") from None
    except UnidentifiedImageError:  # PIL's message names its file object, not the file
        raise DmuhError(f"{name}: cannot read image (not a format Pillow knows)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DmuhError(f"{name}: cannot read image ({first_line(error)})") from None
    array = np.array(image, dtype=np.uint8)  # writable: torch.from_numpy warns on a read-only view
    return array[:, :, None] if array.ndim == 2 else array


class ImageFiles:
    """Unlabeled image files: paths under a directory or inside a zip, or listed one per line."""

    labels = None
    class_names = None

    def __init__(
        self, paths: Sequence[str], base: Optional[Path] = None, zip_path: Optional[Path] = None, channels: int = 3
    ):
        self.ids = list(paths)
        self.base = base
        self.zip_path = zip_path
        self.channels = channels
        if not self.ids:
            raise DmuhError(f"{zip_path or base}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def __len__(self) -> int:
        return len(self.ids)

    def decode(self, indices=None, size: Optional[int] = None) -> np.ndarray:
        indices = range(len(self)) if indices is None else indices
        try:
            archive = zipfile.ZipFile(self.zip_path) if self.zip_path is not None else None
        except (OSError, zipfile.BadZipFile) as error:
            raise DmuhError(f"{self.zip_path}: cannot open zip ({first_line(error)})") from None
        try:

            def one(i):
                relative = self.ids[int(i)]
                if archive is not None:
                    try:
                        data = archive.read(relative)
                    except (KeyError, zipfile.BadZipFile, OSError) as error:
                        raise DmuhError(
                            f"{self.zip_path}:{relative}: cannot read image ({first_line(error)})"
                        ) from None
                    return read_image(None, self.channels, size, data=data, name=f"{self.zip_path}:{relative}")
                path = Path(relative) if self.base is None else self.base / relative
                return read_image(path, self.channels, size)

            if archive is not None:  # one zip handle is not safe to share between threads
                arrays = [one(i) for i in indices]
            else:
                with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                    arrays = list(pool.map(one, indices))
        finally:
            if archive is not None:
                archive.close()
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DmuhError(f"{self.zip_path or self.base}: images differ in size; pass --image-size to resize them")
        return np.stack(arrays) if arrays else np.zeros((0, size or 0, size or 0, self.channels), np.uint8)


def list_image_files(path: Path) -> List[str]:
    """Sorted relative posix paths of the visible image files under a directory or inside a .zip."""

    def visible(relative: str) -> bool:
        return not is_hidden(relative) and Path(relative).suffix.lower() in IMAGE_EXTENSIONS

    if path.is_dir():
        files = []
        for folder, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = [d for d in dirnames if not is_hidden(d)]
            files += [(Path(folder) / f).relative_to(path).as_posix() for f in filenames]
        return sorted(f for f in files if visible(f))
    with zipfile.ZipFile(path) as archive:
        return sorted(n for n in archive.namelist() if not n.endswith("/") and visible(n))


def open_images(spec: str, root: Optional[str] = None, channels: int = 3):
    """The images to encode, with labels where known.

    One image file. A directory or .zip: an ImageFolder (label = parent folder) when every image sits in a class
    folder, else unlabeled files. A .txt list: `path 0 1 0 ...` lines (labeled, as HashNet's lists)
    or bare paths (unlabeled), relative to --root or else to the list's folder. Anything else goes
    to `dmuh.data.open_source` (digits, cifar-batches:DIR, idx:DIR, features:FILE.npz, ...).

    The images to encode are the user's own files, named by the user: a list may point outside its
    root (`../x.jpg`, absolute paths), unlike the list files of a training data set
    (`--allow-outside-root`).
    """
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:  # one image
        return ImageFiles([path.name], base=path.parent, channels=channels)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"):
        try:
            files = list_image_files(path)
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(f"images {spec}: cannot read ({first_line(error)})", field="images") from None
        if not files:  # CIFAR batches, IDX files, ...
            return open_source(spec, root=root, allow_outside_root=True)
        if all("/" in f for f in files):  # an empty folder among them does not matter for encoding
            return open_source(f"folder:{spec}", channels=channels, allow_empty_classes=True)
        if path.is_dir():
            return ImageFiles(files, base=path, channels=channels)
        return ImageFiles(files, zip_path=path, channels=channels)
    if path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = [
                line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
            ]
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"images {spec}: cannot read list file ({first_line(error)})", field="images") from None
        base = Path(root) if root else path.parent
        if not lines:
            raise DataError(f"images {spec}: the list file names no images", field="images")
        if lines and all(len(fields) > 1 for fields in lines):
            return open_source(f"list:{spec}", root=str(base), channels=channels, allow_outside_root=True)
        if not base.is_dir() and base.suffix.lower() == ".zip":
            return ImageFiles([" ".join(f) for f in lines], zip_path=base, channels=channels)
        return ImageFiles([" ".join(f) for f in lines], base=base, channels=channels)
    return open_source(spec, root=root, allow_outside_root=True)


def match_channels(images: np.ndarray, channels: Optional[int]) -> np.ndarray:
    """(n, H, W, c) uint8 -> `channels` channels: grey is repeated to RGB, RGB turned grey (ITU-R 601)."""
    if images.ndim != 4 or channels is None or images.shape[3] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
