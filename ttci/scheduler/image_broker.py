"""The scheduler as the pool's image broker: which images a host lacks, which hosts can serve
one (by content digest), and the bytes streamed from such a host to the one that asked.

Trust: a host asks bearing its own token (X-TT-Host: ID); the scheduler fetches from the
serving host with that host's token, which it alone holds. So a host never learns another
host's token nor its address, and an image is only ever served by a host that reports it whole
(the fetching host verifies every byte against the manifest's sha256s anyway).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import requests

from ttci.model.errors import BadInput, TTError
from ttci.model.naming import ImageName
from ttci.scheduler.hostd_client import HostdError
from ttci.scheduler.hosts import HostPool

__all__ = [
    "CHUNK",
    "ImageBroker",
    "NoSource",
    "missing_images",
    "pool_images",
    "sources_of",
    "stream",
]

log = logging.getLogger("ttci.scheduler.image_broker")
CHUNK = 1 << 20


class NoSource(TTError):
    """No host that is up serves this image (with this digest)."""


def _up_images(hosts: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for h in hosts:
        if h.get("state") == "up":
            for img in h.get("images", []):
                yield h, img


def pool_images(hosts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per image name, the build most up hosts have (then the newest): {name, digest, bytes,
    arch, built_at, hosts}. Images reported without a digest (an older hostd) are left out: they
    cannot be fetched by content. Pure."""
    builds: dict[tuple[str, str], dict[str, Any]] = {}
    for h, img in _up_images(hosts):
        if not img.get("digest"):
            continue
        key = (str(img["name"]), str(img["digest"]))
        entry = builds.setdefault(
            key,
            {
                "name": key[0],
                "digest": key[1],
                "bytes": int(img.get("bytes", 0)),
                "arch": img.get("arch", ""),
                "built_at": img.get("built_at", ""),
                "hosts": [],
            },
        )
        entry["hosts"].append(h["id"])
    best: dict[str, dict[str, Any]] = {}
    for entry in builds.values():
        have = best.get(entry["name"])
        rank = (len(entry["hosts"]), entry["built_at"])
        if have is None or rank > (len(have["hosts"]), have["built_at"]):
            best[entry["name"]] = entry
    return best


def missing_images(hosts: list[dict[str, Any]], host_id: str) -> list[dict[str, Any]]:
    """The pool's images host_id does not have (by name), each with the digest to fetch. Pure."""
    mine = next((h for h in hosts if h["id"] == host_id), None)
    have = {str(i["name"]) for i in (mine or {}).get("images", [])}
    pool = pool_images(hosts)
    return [
        {k: v for k, v in pool[name].items() if k != "hosts"} | {"hosts": len(pool[name]["hosts"])}
        for name in sorted(pool)
        if name not in have
    ]


def sources_of(hosts: list[dict[str, Any]], name: str, digest: str, exclude: str = "") -> list[str]:
    """Up hosts (not `exclude`) that report image name (with digest, if given), shuffled so
    transfers spread over them. Pure but for the shuffle."""
    out = [
        h["id"]
        for h, img in _up_images(hosts)
        if img["name"] == name
        and h["id"] != exclude
        and (not digest or img.get("digest") == digest)
    ]
    random.shuffle(out)
    return out


class ImageBroker:
    def __init__(self, pool: HostPool) -> None:
        self.pool = pool

    def _sources(self, name: str, digest: str, requester: str) -> list[str]:
        canonical = str(ImageName.parse(name))
        found = sources_of(self.pool.public_all(), canonical, digest, exclude=requester)
        if not found:
            raise NoSource(
                f"no host that is up has image {canonical}"
                + (f" with digest {digest[:16]}..." if digest else ""),
                hint="see `tt image list`; build it on one host (tt image build)",
            )
        return found

    def manifest(self, name: str, digest: str, requester: str = "") -> bytes:
        """The manifest from the first source that answers.

        Raises:
            NoSource: nobody has it. HostdError: every source failed (the last one's error).
        """
        failed: list[HostdError] = []
        for hid in self._sources(name, digest, requester):
            try:
                return self.pool.client(hid).image_manifest(str(ImageName.parse(name)), digest)
            except HostdError as e:
                log.warning("host %s could not serve the manifest of %s: %s", hid, name, e)
                failed.append(e)
        raise failed[-1]

    def open_file(
        self, name: str, rel: str, digest: str, byte_range: str, requester: str = ""
    ) -> tuple[str, requests.Response]:
        """(serving host, its streaming response) for one of the image's files."""
        if "/" in rel or rel.startswith("."):
            raise BadInput(f"{rel!r} is not a file of an image", hint="e.g. disk.qcow2")
        failed: list[TTError] = []
        for hid in self._sources(name, digest, requester):
            try:
                client = self.pool.client(hid)
                return hid, client.image_file(str(ImageName.parse(name)), rel, digest, byte_range)
            except (HostdError, BadInput) as e:
                log.warning("host %s could not serve %s of %s: %s", hid, rel, name, e)
                failed.append(e)
        raise failed[-1]

    def distribute(self, name: str, targets: list[str]) -> list[dict[str, Any]]:
        """Ask hosts to fetch the image now (all up hosts lacking it when targets is empty)."""
        canonical = str(ImageName.parse(name))
        hosts = self.pool.public_all()
        pool = pool_images(hosts)
        if canonical not in pool:
            raise NoSource(f"no host that is up has image {canonical}", hint="see tt image list")
        digest = pool[canonical]["digest"]
        if not targets:
            targets = [
                h["id"]
                for h in hosts
                if h.get("state") == "up"
                and canonical not in {i["name"] for i in h.get("images", [])}
            ]
        out = []
        for hid in targets:
            try:
                self.pool.client(hid).fetch_image(canonical, digest)
                out.append({"host": hid, "queued": True})
            except TTError as e:
                out.append({"host": hid, "queued": False, "error": e.message})
        return out


def stream(resp: requests.Response) -> Iterator[bytes]:
    """A host's response as chunks; closed when the reader is done or goes away."""
    try:
        yield from resp.iter_content(CHUNK)
    except requests.RequestException as e:
        log.warning("an image stream from a host broke: %s", type(e).__name__)
    finally:
        resp.close()
