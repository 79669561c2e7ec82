"""The image manifest: what an image is, how to boot it, and how to check it is whole. Pure."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from ttci.model.errors import ImageError
from ttci.model.naming import ImageName

__all__ = ["MANIFEST_FILE", "MANIFEST_VERSION", "FileEntry", "Manifest", "parse_dpkg_status"]

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the image directory
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return cls(path=str(d["path"]), size=int(d["size"]), sha256=str(d["sha256"]))


@dataclass(frozen=True)
class Manifest:
    name: str
    os: str
    release: str
    suite: str
    arch: str
    profile: str
    kernel_version: str
    kernel_cmdline: str
    kernel: FileEntry
    initrd: FileEntry
    disk: FileEntry
    disk_virtual_size: int
    built_at: str
    inputs_key: str
    agent_protocol: int
    packages: tuple[str, ...] = ()
    extra_packages: tuple[str, ...] = ()
    added_files: tuple[str, ...] = ()
    version: int = MANIFEST_VERSION
    notes: tuple[str, ...] = field(default=())
    cache_keys: tuple[str, ...] = ()  # the build-cache trees it was made from (for pruning)
    # The recipe file it was built from (hostd/builders/recipe.py): its text and hash; a
    # pulled image carries both.
    recipe: str = ""
    recipe_sha256: str = ""
    run_commands: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """The image's content address: its files' paths, sizes and sha256s, hashed. Equal
        digests mean byte-identical files (hostd.images.transfer checks every file against
        them before an image is offered)."""
        h = hashlib.sha256()
        for f in sorted(self.files(), key=lambda f: f.path):
            h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
        return h.hexdigest()

    @property
    def image_name(self) -> ImageName:
        return ImageName.parse(self.name)

    def files(self) -> tuple[FileEntry, ...]:
        return (self.kernel, self.initrd, self.disk)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in (
            "packages",
            "extra_packages",
            "added_files",
            "notes",
            "cache_keys",
            "run_commands",
        ):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            if int(d.get("version", 0)) != MANIFEST_VERSION:
                raise ImageError(
                    f"manifest version {d.get('version')} is not {MANIFEST_VERSION}",
                    hint="rebuild the image with this version of tt",
                )
            return cls(
                name=str(d["name"]),
                os=str(d["os"]),
                release=str(d["release"]),
                suite=str(d["suite"]),
                arch=str(d["arch"]),
                profile=str(d["profile"]),
                kernel_version=str(d["kernel_version"]),
                kernel_cmdline=str(d["kernel_cmdline"]),
                kernel=FileEntry.from_dict(d["kernel"]),
                initrd=FileEntry.from_dict(d["initrd"]),
                disk=FileEntry.from_dict(d["disk"]),
                disk_virtual_size=int(d["disk_virtual_size"]),
                built_at=str(d["built_at"]),
                inputs_key=str(d["inputs_key"]),
                agent_protocol=int(d["agent_protocol"]),
                packages=tuple(str(p) for p in d.get("packages", ())),
                extra_packages=tuple(str(p) for p in d.get("extra_packages", ())),
                added_files=tuple(str(p) for p in d.get("added_files", ())),
                notes=tuple(str(p) for p in d.get("notes", ())),
                cache_keys=tuple(str(p) for p in d.get("cache_keys", ())),
                recipe=str(d.get("recipe", "")),
                recipe_sha256=str(d.get("recipe_sha256", "")),
                run_commands=tuple(str(p) for p in d.get("run_commands", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"manifest is malformed: {e!r}", hint="rebuild the image") from e


def parse_dpkg_status(text: str) -> tuple[str, ...]:
    """`name=version` of every installed package in a dpkg status file, sorted."""
    out: list[str] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            arch = fields.get("Architecture", "")
            name = fields["Package"] + (f":{arch}" if arch not in ("", "all") else "")
            out.append(f"{name}={fields.get('Version', '')}")
    return tuple(sorted(out))
