"""Image files on disk: the one list of extensions vlprompt reads and the one way to list them.

Every reader (class folders, test folders, benchmark folders, caption folders and shards, VOC
images) goes through these, so what counts as an image is decided once.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "find_image", "is_image_name", "list_images"]

#: Extensions (lower case) of the image files vlprompt reads, wherever it looks for images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class UnreadableImageError(OSError):
    """An image file that cannot be opened or decoded."""


def is_image_name(name: str | Path) -> bool:
    """Whether a file name (or tar member name) has an image extension, in any case."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders when ``recursive``), sorted by path.
    A folder that does not exist has none."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in found if is_image_name(p) and p.is_file())


def find_image(folder: str | Path, stem: str) -> Path:
    """The image ``folder/<stem>.<ext>``: ``.jpg`` first, then the other extensions in
    :data:`IMAGE_EXTENSIONS` order; ``folder/<stem>.jpg`` when none exists (reported as missing)."""
    folder = Path(folder)
    preferred = folder / f"{stem}.jpg"
    if preferred.is_file():
        return preferred
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return preferred
