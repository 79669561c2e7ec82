"""The images under a host's --image-path: scanned on every call, so new ones appear at once."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ttci.model.errors import BadInput, ImageError
from ttci.model.manifest import MANIFEST_FILE, Manifest
from ttci.model.naming import ImageName, select_by_prefix

__all__ = ["Broken", "Image", "check_dir", "find", "scan"]

log = logging.getLogger("hostd.catalogue")


@dataclass(frozen=True)
class Image:
    manifest: Manifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    def file(self, rel: str) -> Path:
        return self.path / rel


@dataclass(frozen=True)
class Broken:
    path: Path
    reason: str


def check_dir(path: Path) -> Image:
    """The image in directory path if it is whole (manifest readable, named for it, every file
    there with its size); ImageError says what is wrong."""
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ImageError("no manifest.json (a partial or foreign directory)") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"manifest.json unreadable: {e}") from e
    manifest = Manifest.from_dict(data)
    expected = ImageName.parse(manifest.name).dirname
    if path.name != expected:
        raise ImageError(f"directory should be named {expected} for {manifest.name}")
    for f in manifest.files():
        p = path / f.path
        if not p.is_file():
            raise ImageError(f"{f.path} is missing")
        if p.stat().st_size != f.size:
            raise ImageError(f"{f.path} is {p.stat().st_size} bytes, manifest says {f.size}")
    return Image(manifest, path)


def scan(image_path: Path) -> tuple[list[Image], list[Broken]]:
    """Every whole image, and every directory that looks like one but is not (with why)."""
    images: list[Image] = []
    broken: list[Broken] = []
    if not image_path.is_dir():
        return images, broken
    for child in sorted(image_path.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue  # .build-*: a build in progress, never offered
        try:
            images.append(check_dir(child))
        except ImageError as e:
            broken.append(Broken(child, e.message))
    return images, broken


def find(image_path: Path, name_or_prefix: str) -> Image:
    """One image by exact name or by a prefix that selects exactly one.

    Raises:
        BadInput: nothing or several match; the message lists what exists.
    """
    images, _ = scan(image_path)
    by_name = {i.name: i for i in images}
    if name_or_prefix.lower() in by_name:
        return by_name[name_or_prefix.lower()]
    matches = select_by_prefix(by_name, name_or_prefix)
    if len(matches) == 1:
        return by_name[matches[0]]
    known = ", ".join(sorted(by_name)) or "none (build one with `tt image build`)"
    if not matches:
        raise BadInput(f"no image matches {name_or_prefix!r}", hint=f"images here: {known}")
    raise BadInput(
        f"{name_or_prefix!r} matches {len(matches)} images: {', '.join(matches)}",
        hint="give the full name",
    )
