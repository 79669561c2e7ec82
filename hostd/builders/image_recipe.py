"""What an image build does, as plain values: specs, cache keys, mmdebstrap argv, cmdlines. Pure."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.naming import DEFAULT_PROFILE, ImageName, Release, parse_profile, parse_variant
from ttci.wire.agent_protocol import PROTOCOL_VERSION

__all__ = [
    "BASE_PACKAGES",
    "BUILDER_VERSION",
    "DEFAULT_DISK_SIZE",
    "DEFAULT_MIRROR",
    "DEFAULT_TARGETS",
    "PROFILE_PACKAGES",
    "AddedFile",
    "BuildSpec",
]

BUILDER_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_DISK_SIZE = 4 << 30

# A configured Debian system a CI job can use; minbase already brings apt, bash and dpkg.
BASE_PACKAGES = (
    "python3",
    "git",
    "ca-certificates",
    "iproute2",
    "procps",
    "busybox-static",
    "less",
    "xz-utils",
)
PROFILE_PACKAGES = {
    "agent": (),
    "systemd": ("systemd-sysv", "udev", "dbus", "openssh-server"),
}

# The images `tt image build --default` and the README's main job build. riscv64 comes from the
# newest suite whose index works on these mirrors (trixie's riscv64 index fails here:
# docs/facts/images.md).
DEFAULT_TARGETS: tuple[tuple[str, Arch], ...] = (
    ("debian-12", Arch.AMD64),
    ("debian-12", Arch.ARM64),
    ("debian-12", Arch.I386),
    ("debian-12", Arch.ARMHF),
    ("debian-12", Arch.PPC64EL),
    ("debian-12", Arch.S390X),
    ("debian-13", Arch.AMD64),
    ("debian-13", Arch.ARM64),
    ("debian-14", Arch.RISCV64),
)


@dataclass(frozen=True)
class AddedFile:
    """`--add SRC:DEST`: a host file or directory copied into the image."""

    src: Path
    dest: str
    mode: int | None = None  # a recipe's `mode:` (None: the source's own)

    @classmethod
    def parse(cls, text: str) -> AddedFile:
        src, sep, dest = text.rpartition(":")
        if not sep or not src or not dest.startswith("/"):
            raise BadInput(
                f"--add {text!r} does not parse",
                hint="write --add HOST_PATH:/ABSOLUTE/GUEST/PATH",
            )
        if ".." in Path(dest).parts:
            raise BadInput(f"--add destination {dest!r} leaves the image", hint="drop the `..`")
        return cls(Path(src), dest)


@dataclass(frozen=True)
class BuildSpec:
    release: Release
    arch: Arch
    profile: str = DEFAULT_PROFILE
    packages: tuple[str, ...] = ()
    adds: tuple[AddedFile, ...] = ()
    disk_size: int = DEFAULT_DISK_SIZE
    mirror: str = DEFAULT_MIRROR
    # From a recipe file (hostd/builders/recipe.py): the image's +NAME, commands run in the
    # image at build time, the recipe's text and hash (both part of the image's identity).
    variant: str = ""
    commands: tuple[str, ...] = ()
    recipe: str = field(default="", compare=False, repr=False)
    recipe_sha256: str = ""

    def __post_init__(self) -> None:
        parse_profile(self.profile)
        if self.variant:
            parse_variant(self.variant)
        for pkg in self.packages:
            if not pkg or not all(c.isalnum() or c in "+-.:=~" for c in pkg):
                raise BadInput(f"package name {pkg!r} is not valid", hint="use Debian names")
        if self.disk_size < 1 << 30:
            raise BadInput(
                f"disk size {self.disk_size} is under 1 GiB", hint="pass --size 2G or more"
            )

    @property
    def name(self) -> ImageName:
        return ImageName("qemu", self.release.name, self.arch, self.variant or self.profile)

    def all_packages(self) -> tuple[str, ...]:
        return tuple(sorted({*BASE_PACKAGES, *PROFILE_PACKAGES[self.profile], *self.packages}))

    def rootfs_key(self) -> str:
        """Cache key of the mmdebstrap rootfs: same inputs, same tree."""
        return _key(
            {
                "v": BUILDER_VERSION,
                "suite": self.release.suite,
                "arch": self.arch.value,
                "packages": self.all_packages(),
                "mirror": self.mirror,
                "hooks": (_ESSENTIAL_HOOKS, _ROOTFS_HOOKS),  # templates: no venv path
            }
        )

    def kernel_key(self) -> str:
        return _key(
            {
                "v": BUILDER_VERSION,
                "suite": self.release.suite,
                "arch": self.arch.value,
                "pkg": self.arch.row.kernel_package,
                "mirror": self.mirror,
            }
        )

    def inputs_key(self, guest_files_digest: str, added_digest: str) -> str:
        """Key of the whole image: rootfs, kernel, agent code, added files and disk size, and
        a recipe's hash and commands (only when there is one: other keys stay as they were)."""
        inputs: dict[str, object] = {
            "rootfs": self.rootfs_key(),
            "kernel": self.kernel_key(),
            "guest": guest_files_digest,
            "added": added_digest,
            "size": self.disk_size,
            "profile": self.profile,
            "protocol": PROTOCOL_VERSION,
        }
        if self.recipe_sha256:
            inputs["recipe"] = self.recipe_sha256
        if self.commands or self.variant:
            inputs["commands"] = self.commands
            inputs["variant"] = self.variant
        return _key(inputs)

    def apt_options(self) -> list[str]:
        return ['Acquire::Check-Valid-Until "false"'] if self.release.testing else []

    def rootfs_argv(self, target: Path) -> list[str]:
        argv = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            f"--architectures={self.arch.value}",
            f"--include={','.join(self.all_packages())}",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ]
        argv += [f"--aptopt={o}" for o in self.apt_options()]
        argv += ["--hook-directory=/usr/share/mmdebstrap/hooks/eatmydata"]
        argv += [f"--essential-hook={h}" for h in _ESSENTIAL_HOOKS]
        argv += [f"--customize-hook={h.format(python=sys.executable)}" for h in _ROOTFS_HOOKS]
        argv += [self.release.suite, str(target), self.mirror]
        return argv

    def kernel_argv(self, target: Path) -> list[str]:
        """Unpack the kernel package (and its dependencies) without running anything."""
        argv = [
            "mmdebstrap",
            "--variant=extract",
            f"--architectures={self.arch.value}",
            f"--include={self.arch.row.kernel_package}",
        ]
        argv += [f"--aptopt={o}" for o in self.apt_options()]
        argv += [self.release.suite, str(target), self.mirror]
        return argv

    def kernel_cmdline(self, console: bool = True) -> str:
        words = []
        if console:
            words.append(f"console={self.arch.row.console}")
        words += ["root=/dev/vda", "rw", "quiet", "cryptomgr.notests", "panic=-1"]
        words += list(self.arch.row.extra_cmdline)
        if self.profile == "systemd":
            words.append("tt.init=/lib/systemd/systemd")
        return " ".join(words)


# update-ca-certificates takes ~65 s under qemu-user: divert it to a no-op during the install and
# do its work natively afterwards (hostd.images.cacerts).
_UCC = "/usr/sbin/update-ca-certificates"
_ESSENTIAL_HOOKS = (
    f'chroot "$1" dpkg-divert --quiet --local --rename --add {_UCC}',
    f'printf "#!/bin/sh\\nexit 0\\n" > "$1{_UCC}"; chmod 755 "$1{_UCC}"',
)
# Run by mmdebstrap inside the new rootfs ("$1" is its path). Users, host name, fstab, CA certs.
_ROOTFS_HOOKS = (
    f'rm -f "$1{_UCC}"; chroot "$1" dpkg-divert --quiet --local --rename --remove {_UCC}',
    '{python} -m hostd.images.cacerts "$1"',
    'chroot "$1" useradd --create-home --shell /bin/bash --uid 1000 --user-group ci',
    'chroot "$1" passwd --delete root',
    'echo tt-guest > "$1/etc/hostname"',
    'printf "127.0.0.1 localhost\\n127.0.1.1 tt-guest\\n" > "$1/etc/hosts"',
    'echo "/dev/vda / ext4 rw,noatime 0 1" > "$1/etc/fstab"',
    'rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"; : > "$1/etc/machine-id"',
)


def _key(obj: object) -> str:
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]
