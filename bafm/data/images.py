"""ImageNet-style image folders and the ADM center crop.

Two layouts are understood: class sub-folders (``<root>/<class>/<image>``; classes sorted by
name get ids ``0..K-1``, as torchvision's ``ImageFolder`` and the ADM/DiT data loaders do), or
a list file of ``<relative path> <label>`` lines (relative to the image folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ImageList:
    """Image files with class ids.

    Attributes:
        root: the image folder.
        paths: paths relative to ``root``.
        labels: class id per path.
        class_names: name per class id (folder names, or the ids as text for list files).
    """

    root: Path
    paths: List[str]
    labels: List[int]
    class_names: List[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(image_dir: str | Path, list_file: str | Path = "") -> ImageList:
    """Find the images of an ImageNet-style folder.

    Args:
        image_dir: root folder.
        list_file: optional file of ``<relative path> <label>`` lines; blank lines and lines
            starting with ``#`` are ignored. Without it, each sub-folder of ``image_dir`` is a
            class (sorted by name) and its images are found recursively, in sorted order.

    Returns:
        The images, in a fixed order.

    Raises:
        FileNotFoundError: missing folder or list file, or no images at all.
        ValueError: a malformed list line (names file and line) or a class folder without images.
    """
    root = Path(image_dir)
    if not str(image_dir) or not root.is_dir():
        raise FileNotFoundError(
            f"image folder '{image_dir}' not found: set data.image_dir to an ImageNet-style folder "
            f"(one sub-folder per class) or give data.list_file."
        )
    if list_file:
        return _from_list(root, Path(list_file))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"'{root}' has no class sub-folders; expected <root>/<class>/<image>.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not found:
            raise ValueError(f"class folder '{root / name}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += found
        labels += [label] * len(found)
    return ImageList(root, paths, labels, classes)


def _from_list(root: Path, list_file: Path) -> ImageList:
    if not list_file.is_file():
        raise FileNotFoundError(f"list file '{list_file}' not found (data.list_file).")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{list_file}:{number}: expected '<relative path> <label>' with label >= 0, got '{line}'.")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise FileNotFoundError(f"list file '{list_file}' lists no images.")
    num_classes = max(labels) + 1
    return ImageList(root, paths, labels, [str(i) for i in range(num_classes)])


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: halve with BOX filtering while the short side is at least twice
    ``image_size``, resize with BICUBIC so the short side equals ``image_size``, then crop
    the center square.

    Args:
        image: RGB PIL image.
        image_size: output side in pixels.

    Returns:
        uint8 array ``(image_size, image_size, 3)``.
    """
    # Repeated 2x box downsampling first keeps large images from aliasing under bicubic.
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Read an image, convert to RGB, center crop, scale to ``[-1, 1]``.

    Returns:
        float32 ``(3, image_size, image_size)``.

    Raises:
        ValueError: unreadable image, naming the file.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as err:  # PIL raises many types for damaged files
        raise ValueError(f"cannot read image '{path}': {err}") from None
    arr = center_crop_arr(img, image_size)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """Center-cropped images of an ``ImageList`` for a ``DataLoader``.

    Items are ``(image (3, S, S) float32 in [-1, 1], label, index)``.
    """

    def __init__(self, images: ImageList, image_size: int) -> None:
        """Wrap ``images`` cropped to ``image_size``."""
        self.images, self.image_size = images, image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        path = self.images.root / self.images.paths[index]
        return load_image(path, self.image_size), self.images.labels[index], index
