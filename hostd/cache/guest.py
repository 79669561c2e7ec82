"""The commands hostd runs in a guest (through its agent) to mount and release a cache disk."""

from __future__ import annotations

__all__ = ["CACHE_SERIAL", "mount_argv", "release_argv"]

CACHE_SERIAL = "tt-cache"  # the cache disk's virtio serial: the guest finds it by this

# $1 is the mount path (ttci/model/cache.py checked it); never interpolated into the script.
_MOUNT = f"""set -e
dev=
for d in /sys/block/vd*; do
  if [ "$(cat "$d/serial" 2>/dev/null)" = {CACHE_SERIAL} ]; then dev=/dev/${{d##*/}}; fi
done
if [ -z "$dev" ]; then echo "tt: no cache disk (serial {CACHE_SERIAL}) in this VM" >&2; exit 3; fi
mkdir -p -- "$1"
mount -t ext4 -o noinit_itable,noatime "$dev" "$1"
chmod 1777 "$1"
"""

# A clean file system before the VM is destroyed: unmount it, or (a job left a process in it)
# freeze it, which also writes everything out.
_RELEASE = """sync
umount -- "$1" 2>/dev/null && exit 0
sleep 0.3
umount -- "$1" 2>/dev/null && exit 0
fsfreeze --freeze -- "$1"
"""


def mount_argv(path: str) -> list[str]:
    return ["/bin/sh", "-c", _MOUNT, "tt-cache-mount", path]


def release_argv(path: str) -> list[str]:
    return ["/bin/sh", "-c", _RELEASE, "tt-cache-release", path]
