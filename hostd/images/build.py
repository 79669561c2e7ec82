"""`tt image build`: mmdebstrap rootfs + host-built kernel/initrd -> a qcow2 image with manifest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hostd.builders import cpio
from hostd.builders.image_recipe import BuildSpec
from hostd.builders.initrd_modules import load_order, parse_builtin, parse_modules_dep
from hostd.images.binfmt import Binfmt, restore_leftovers
from hostd.images.catalogue import scan
from hostd.images.fs import atomic_replace_dir, free_bytes, safe_rmtree
from hostd.images.guest_files import (
    GUEST_DIR,
    digest_adds,
    digest_files,
    guest_files,
    install_files,
)
from ttci.infra.log import step
from ttci.infra.proc import need, run, run_streaming
from ttci.model.errors import CommandFailed, ImageError
from ttci.model.manifest import MANIFEST_FILE, FileEntry, Manifest, parse_dpkg_status
from ttci.wire.agent_protocol import PROTOCOL_VERSION

__all__ = [
    "MIN_FREE",
    "Builder",
    "build_image",
    "build_initrd",
    "existing_manifest",
    "guest_files",
    "prune_cache",
    "sha256_file",
]

log = logging.getLogger("hostd.images")

MIN_FREE = 3 << 30


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another image build runs on this host; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _clean_stale(dirs: list[Path]) -> None:
    """Leftovers of a build that was killed: partial trees, maybe with mounts inside."""
    for d in dirs:
        if not d.exists():
            continue
        for child in d.iterdir():
            if child.name.startswith((".build-", ".tmp-", ".old-")):
                log.info("removing leftover of an interrupted build: %s", child)
                safe_rmtree(child)


def _progress(prefix: str) -> Callable[[str], None]:
    def show(line: str) -> None:
        if line.strip():
            log.info("%s %s", prefix, line)

    return show


def _cached_tree(
    cache_dir: Path,
    kind: str,
    key: str,
    argv_for: Callable[[Path], list[str]],
    cancel: threading.Event | None = None,
) -> Path:
    final = cache_dir / f"{kind}-{key}"
    if (final / ".tt-complete").exists():
        log.info("%s: cached at %s", kind, final)
        return final
    tmp = cache_dir / f".tmp-{kind}-{key}-{os.getpid()}-{threading.get_ident()}"
    safe_rmtree(tmp)
    try:
        run_streaming(argv_for(tmp), on_line=_progress(f"[{kind}]"), cancel=cancel)
        (tmp / ".tt-complete").write_text(dt.datetime.now(dt.UTC).isoformat())
        if final.exists():
            safe_rmtree(final)
        tmp.rename(final)
    except BaseException:
        safe_rmtree(tmp)
        raise
    return final


def _find_kernel(tree: Path) -> tuple[str, Path]:
    """The kernel version and image file in an unpacked kernel package."""
    for mods in (tree / "usr/lib/modules", tree / "lib/modules"):
        if mods.is_dir() and not mods.is_symlink():
            versions = sorted(p.name for p in mods.iterdir() if p.is_dir())
            if versions:
                kver = versions[-1]
                for cand in (
                    tree / "boot" / f"vmlinuz-{kver}",
                    tree / "boot" / f"vmlinux-{kver}",
                    mods / kver / "vmlinuz",
                ):
                    if cand.exists():
                        return kver, cand
    raise ImageError(f"no kernel found in {tree}", hint="check the arch row's kernel package")


def _module_root(tree: Path, kver: str) -> Path:
    """depmod -b wants BASE/lib/modules/KVER; newer kernels ship in /usr/lib/modules."""
    usr = tree / "usr/lib/modules" / kver
    legacy = tree / "lib/modules" / kver
    if usr.is_dir() and not legacy.exists():
        base = tree / ".depmod-root"
        (base / "lib/modules").mkdir(parents=True, exist_ok=True)
        link = base / "lib/modules" / kver
        if not link.exists():
            link.symlink_to(usr)
        return base
    return tree


def build_initrd(kernel_tree: Path, kver: str, busybox: Path, spec: BuildSpec) -> bytes:
    base = _module_root(kernel_tree, kver)
    run([need("depmod"), "-b", str(base), kver])
    moddir = base / "lib/modules" / kver
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin_file = moddir / "modules.builtin"
    builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    required, optional = spec.arch.initrd_modules()
    order = load_order(deps, builtin, required, optional)
    entries = [cpio.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys")]
    entries.append(cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(cpio.file("init", (GUEST_DIR / "initrd-init").read_bytes(), 0o755))
    entries.append(cpio.file("bin/busybox", busybox.read_bytes(), 0o755))
    names: list[str] = []
    for rel in order:
        src = moddir / rel
        data = src.read_bytes()
        if rel.endswith(".xz"):
            data = lzma.decompress(data)
        elif rel.endswith(".zst"):
            data = run(["zstd", "-dc", str(src)]).stdout
        name = rel.rsplit("/", 1)[-1].split(".ko")[0] + ".ko"
        entries.append(cpio.file(f"lib/modules/{name}", data))
        names.append(name)
    entries.append(cpio.file("lib/modules/load.order", "".join(n + "\n" for n in names).encode()))
    return cpio.gz_newc(entries)


def _tree_bytes(root: Path) -> int:
    out = run(["du", "-sx", "--block-size=1", str(root)]).stdout.decode()
    return int(out.split()[0])


def existing_manifest(final: Path) -> Manifest | None:
    try:
        return Manifest.from_dict(json.loads((final / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, ImageError):
        return None


class Builder:
    """Builds images into one image path with one cache; several may build at once (--jobs).

    Builds of one process share the cache lock, binfmt_misc changes and per-key tree locks, so
    two images that need the same kernel or rootfs tree build it once.
    """

    def __init__(self, image_path: Path, cache_dir: Path) -> None:
        self.image_path = image_path
        self.cache_dir = cache_dir
        self.binfmt = Binfmt(cache_dir)
        self.cancel = threading.Event()
        self.durations: dict[str, float] = {}  # image name -> seconds its build took
        self._tree_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _tree_lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._tree_locks.setdefault(key, threading.Lock())

    def preflight(self) -> None:
        for tool in ("mmdebstrap", "qemu-img", "mkfs.ext4", "depmod"):
            need(tool)
        self.image_path.mkdir(parents=True, exist_ok=True)
        for d in (self.image_path, self.cache_dir):
            free = free_bytes(d)
            if free < MIN_FREE:
                raise ImageError(
                    f"only {free >> 20} MiB free under {d}; a build needs {MIN_FREE >> 30} GiB",
                    hint="free some space or pass --image-path/--cache-dir on a bigger disk",
                )

    def build_many(
        self,
        specs: list[BuildSpec],
        *,
        force: bool = False,
        jobs: int = 1,
        on_done: Callable[[Manifest, bool], None] | None = None,
    ) -> list[tuple[Manifest, bool]]:
        """Build specs, `jobs` at a time. Ctrl-C/SIGTERM cancels every build and cleans up.

        Raises:
            ImageError, MissingTool, CommandFailed: the first failure (the others finish first).
        """
        self.preflight()
        for spec in specs:
            digest_adds(spec)  # bad --add fails before anything starts
        with _build_lock(self.cache_dir):
            restore_leftovers(self.cache_dir)
            _clean_stale([self.image_path, self.cache_dir])
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = [pool.submit(self._build_one, spec, force) for spec in specs]
                try:
                    results = []
                    for f in futures:
                        results.append(f.result())
                        if on_done:
                            on_done(*results[-1])
                    return results
                except BaseException:
                    self.cancel.set()
                    for f in futures:
                        f.cancel()
                    concurrent.futures.wait(futures)
                    raise

    def _cached_tree(self, kind: str, key: str, argv_for: Callable[[Path], list[str]]) -> Path:
        with self._tree_lock(f"{kind}-{key}"):
            return _cached_tree(self.cache_dir, kind, key, argv_for, self.cancel)

    def _build_one(self, spec: BuildSpec, force: bool) -> tuple[Manifest, bool]:
        t0 = time.monotonic()
        try:
            return self._build_one_timed(spec, force)
        finally:
            self.durations[str(spec.name)] = time.monotonic() - t0

    def _build_one_timed(self, spec: BuildSpec, force: bool) -> tuple[Manifest, bool]:
        if self.cancel.is_set():
            raise KeyboardInterrupt("cancelled")
        files = guest_files(spec.profile)
        key = spec.inputs_key(digest_files(files), digest_adds(spec))
        final = self.image_path / spec.name.dirname
        old = None if force else _up_to_date(spec, key, final)
        if old is not None:
            return old, False
        work = self.image_path / (
            f".build-{spec.name.dirname}-{os.getpid()}-{threading.get_ident()}"
        )
        with contextlib.ExitStack() as stack:
            stack.callback(safe_rmtree, work)
            work.mkdir()
            with step(log, f"{spec.name}: kernel {spec.arch.row.kernel_package}"):
                ktree = self._cached_tree("kernel", spec.kernel_key(), spec.kernel_argv)
            stack.enter_context(self.binfmt.foreign(spec.arch))
            with step(log, f"{spec.name}: rootfs ({spec.release.suite}, mmdebstrap)"):
                rtree = self._cached_tree("rootfs", spec.rootfs_key(), spec.rootfs_argv)
            root = work / "root"
            with step(log, f"{spec.name}: assemble"):
                kver = _assemble(spec, files=files, rtree=rtree, ktree=ktree, root=root, work=work)
            with step(log, f"{spec.name}: disk image"):
                packages = _make_disk(spec, root, work)
            manifest = _manifest(spec, work, kver, key, packages)
            (work / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
            for f in ("vmlinuz", "initrd.img", "disk.qcow2"):
                (work / f).chmod(0o444)
            atomic_replace_dir(work, final)
            stack.pop_all()
        log.info("%s built: %s", spec.name, final)
        return manifest, True


def _up_to_date(spec: BuildSpec, key: str, final: Path) -> Manifest | None:
    """The image already built from the same inputs, with every file whole; else None."""
    old = existing_manifest(final)
    if not old or old.inputs_key != key:
        return None
    if not all(
        (final / f.path).exists() and (final / f.path).stat().st_size == f.size for f in old.files()
    ):
        return None
    log.info("%s is up to date (inputs %s)", spec.name, key)
    keys = _cache_keys(spec)
    if old.cache_keys != keys:  # a manifest from before cache keys were recorded
        old = dataclasses.replace(old, cache_keys=keys)
        (final / MANIFEST_FILE).write_text(json.dumps(old.to_dict(), indent=2) + "\n")
    return old


def _assemble(
    spec: BuildSpec,
    *,
    files: dict[str, tuple[int, bytes]],
    rtree: Path,
    ktree: Path,
    root: Path,
    work: Path,
) -> str:
    """The image's root tree with our files, its kernel and host-built initrd; the kernel
    version."""
    run(["cp", "-a", "--reflink=auto", str(rtree), str(root)])
    (root / ".tt-complete").unlink(missing_ok=True)
    install_files(root, spec, files)
    _run_commands(spec, root)
    # Byte-compile the agent with the guest's own python: saves ~0.3 s per boot.
    run(
        [
            *("chroot", str(root), "python3", "-m", "compileall", "-q"),
            *("--invalidation-mode", "unchecked-hash", "/usr/lib/tt-agent"),
        ]
    )
    kver, kfile = _find_kernel(ktree)
    shutil.copyfile(kfile, work / "vmlinuz")
    busybox = root / "bin/busybox"
    if not busybox.exists():
        raise ImageError(f"{busybox} missing", hint="busybox-static must be installed")
    (work / "initrd.img").write_bytes(build_initrd(ktree, kver, busybox, spec))
    return kver


# A recipe's commands see a Debian system: /proc mounted (in a mount namespace of their own,
# so the mount goes when they end), a fixed environment, no terminal.
_RUN_IN_ROOT = 'mount -t proc proc "$1/proc" && exec chroot "$1" /bin/sh -ec "$2"'
_RUN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def _run_commands(spec: BuildSpec, root: Path) -> None:
    """A recipe's `run:` commands, in order, in the image's root (under qemu-user for a
    foreign arch: the caller holds binfmt_misc). The first that fails fails the build."""
    for n, cmd in enumerate(spec.commands, 1):
        with step(log, f"{spec.name}: run {n}/{len(spec.commands)}"):
            try:
                run_streaming(
                    [
                        *(need("unshare"), "--mount", "--propagation", "private", "--"),
                        *("sh", "-c", _RUN_IN_ROOT, "tt-run", str(root), cmd),
                    ],
                    on_line=_progress(f"[run {n}]"),
                    env=_RUN_ENV,
                )
            except CommandFailed as e:
                raise ImageError(
                    f"{spec.name}: recipe command {n} failed: {cmd[:200]}",
                    hint=f"its output is in the log above ([run {n}]); {e.message[:300]}",
                ) from e


def _make_disk(spec: BuildSpec, root: Path, work: Path) -> tuple[str, ...]:
    """root -> work/disk.qcow2 (ext4, no loop mounts); the packages it holds. root is removed."""
    used = _tree_bytes(root)
    if used * 1.15 + (256 << 20) > spec.disk_size:
        raise ImageError(
            f"the rootfs needs {used >> 20} MiB, more than the disk of "
            f"{spec.disk_size >> 20} MiB allows",
            hint="pass a bigger --size",
        )
    raw = work / "disk.raw"
    run(
        [
            *("mkfs.ext4", "-q", "-F", "-L", "ttroot", "-d", str(root)),
            *(str(raw), f"{spec.disk_size >> 20}M"),
        ]
    )
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
    raw.unlink()
    packages = parse_dpkg_status((root / "var/lib/dpkg/status").read_text())
    safe_rmtree(root)
    return packages


def _manifest(
    spec: BuildSpec, work: Path, kver: str, key: str, packages: tuple[str, ...]
) -> Manifest:
    return Manifest(
        name=str(spec.name),
        os=spec.release.os,
        release=spec.release.name,
        suite=spec.release.suite,
        arch=spec.arch.value,
        profile=spec.profile,
        kernel_version=kver,
        kernel_cmdline=spec.kernel_cmdline(),
        kernel=_entry(work, "vmlinuz"),
        initrd=_entry(work, "initrd.img"),
        disk=_entry(work, "disk.qcow2"),
        disk_virtual_size=spec.disk_size,
        built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        inputs_key=key,
        cache_keys=_cache_keys(spec),
        agent_protocol=PROTOCOL_VERSION,
        packages=packages,
        extra_packages=spec.packages,
        added_files=tuple(f"{a.src}:{a.dest}" for a in spec.adds),
        recipe=spec.recipe,
        recipe_sha256=spec.recipe_sha256,
        run_commands=spec.commands,
    )


def build_image(
    spec: BuildSpec, image_path: Path, cache_dir: Path, *, force: bool = False
) -> tuple[Manifest, bool]:
    """Build one image unless an identical one is there; returns (manifest, built)."""
    return Builder(image_path, cache_dir).build_many([spec], force=force)[0]


def _entry(work: Path, name: str) -> FileEntry:
    p = work / name
    return FileEntry(path=name, size=p.stat().st_size, sha256=sha256_file(p))


def _cache_keys(spec: BuildSpec) -> tuple[str, ...]:
    return (f"kernel-{spec.kernel_key()}", f"rootfs-{spec.rootfs_key()}")


def prune_cache(image_path: Path, cache_dir: Path) -> list[Path]:
    """Remove build-cache trees that no image under image_path was made from.

    Images built before manifests recorded their cache keys keep every tree (nothing is
    removed while any such image exists). Returns what was removed.
    """
    images, _ = scan(image_path)
    if any(not i.manifest.cache_keys for i in images):
        log.info("an image predates cache keys; rebuild it before pruning: nothing removed")
        return []
    keep = {k for i in images for k in i.manifest.cache_keys}
    removed = []
    with _build_lock(cache_dir):
        for tree in sorted(cache_dir.glob("*-*")):
            if (
                tree.is_dir()
                and tree.name.startswith(("kernel-", "rootfs-"))
                and tree.name not in keep
            ):
                safe_rmtree(tree)
                removed.append(tree)
    return removed
