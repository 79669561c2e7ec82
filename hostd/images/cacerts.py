"""Native update-ca-certificates for a foreign rootfs.

Debian's update-ca-certificates is a shell loop that takes ~65 s under qemu-user for one
foreign-arch image; this does the same on the host in about a second: the /etc/ssl/certs/*.pem
links, the OpenSSL hash links (from the host's `openssl rehash`) and ca-certificates.crt.

    python -m hostd.images.cacerts ROOTFS
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ttci.infra.proc import run

__all__ = ["LOCAL", "SHARE", "selected", "update"]

SHARE = "usr/share/ca-certificates"
LOCAL = "usr/local/share/ca-certificates"


def selected(root: Path) -> list[str]:
    """Guest paths of the certificates ca-certificates.conf selects, plus local ones."""
    conf = root / "etc/ca-certificates.conf"
    if not conf.exists():  # no conf yet: every certificate shipped is selected
        names = sorted(str(p.relative_to(root / SHARE)) for p in (root / SHARE).rglob("*.crt"))
    else:
        names = [
            line.strip()
            for line in conf.read_text().splitlines()
            if line.strip() and not line.startswith(("#", "!"))
        ]
    out = [f"/{SHARE}/{n}" for n in names if (root / SHARE / n).is_file()]
    local = root / LOCAL
    if local.is_dir():
        out += [f"/{p.relative_to(root)}" for p in sorted(local.rglob("*.crt"))]
    return out


def update(root: Path) -> int:
    certs = selected(root)
    etc = root / "etc/ssl/certs"
    etc.mkdir(parents=True, exist_ok=True)
    for p in etc.iterdir():
        if p.is_symlink():
            p.unlink()
    bundle = bytearray()
    with tempfile.TemporaryDirectory() as tmp:
        for guest_path in certs:
            pem = Path(guest_path).name.removesuffix(".crt") + ".pem"
            (etc / pem).symlink_to(guest_path)
            data = (root / guest_path.lstrip("/")).read_bytes()
            (Path(tmp) / pem).write_bytes(data)
            bundle += data if data.endswith(b"\n") else data + b"\n"
        run(["openssl", "rehash", tmp])
        for link in Path(tmp).iterdir():
            if link.is_symlink():
                (etc / link.name).symlink_to(os.readlink(link))
    (etc / "ca-certificates.crt").write_bytes(bytes(bundle))
    return len(certs)


if __name__ == "__main__":
    n = update(Path(sys.argv[1]))
    print(f"I: ca-certificates: {n} certificates installed natively")
