"""Image recipes as files: a YAML document -> the BuildSpecs it declares. Pure (text in, values
out; whether the files it names exist is checked by hostd.images.recipes, with these lines).

    name: gitlab                 # optional: the image is qemu:debian-12+gitlab:ARCH
    base:
      release: debian-12         # required
      arch: [amd64, arm64]       # one or a list (default amd64)
      profile: agent             # agent or systemd (default agent)
    packages: [git-lfs]          # extra Debian packages
    files:                       # src relative to the recipe's folder; {arch}: Debian's name
      - {src: bin/gitlab-runner-{arch}, dest: /usr/local/bin/gitlab-runner, mode: "0755"}
    run:                         # shell commands run in the image at build time, in order
      - gitlab-runner --version
    size: 4G

Every mistake is a RecipeError naming the file and line (YAML's marks). The recipe's hash
(`Recipe.sha256`, of its content: comments and layout do not count) joins the image's inputs
key and its manifest, which also carries the recipe's text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hostd.builders.image_recipe import DEFAULT_DISK_SIZE, AddedFile, BuildSpec
from ttci.model.arch import Arch
from ttci.model.errors import BadInput
from ttci.model.naming import DEFAULT_PROFILE, PROFILES, Release, parse_release, parse_variant

__all__ = [
    "MAX_RECIPE_BYTES",
    "Recipe",
    "RecipeError",
    "RecipeFile",
    "parse_recipe",
    "parse_size",
]

MAX_RECIPE_BYTES = 1 << 20
MIN_DISK_SIZE = 1 << 30
_TOP = ("name", "base", "packages", "files", "run", "size")
_BASE = ("release", "arch", "profile")
_FILE = ("src", "dest", "mode")


class RecipeError(BadInput):
    """A recipe that does not parse or breaks its schema (the message names file and line)."""


def parse_size(text: str) -> int:
    """`4G`, `2048M`, `8GiB`, a number of bytes -> bytes; ValueError if it does not parse."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


@dataclass(frozen=True)
class RecipeFile:
    """One `files:` entry: src as written (relative to the recipe, may hold {arch} or be a
    map arch -> path), its guest destination, an optional mode, and its line."""

    src: str | tuple[tuple[str, str], ...]
    dest: str
    mode: int | None
    line: int

    def src_for(self, arch: Arch) -> str | None:
        if isinstance(self.src, str):
            return self.src.replace("{arch}", arch.value)
        return dict(self.src).get(arch.value)


@dataclass(frozen=True)
class Recipe:
    path: Path  # where it was read (sources are relative to its folder)
    text: str
    name: str  # the image variant ("" -> the profile's plain name)
    release: Release
    arches: tuple[Arch, ...]
    profile: str
    packages: tuple[str, ...]
    files: tuple[RecipeFile, ...]
    run: tuple[str, ...]
    disk_size: int

    @property
    def sha256(self) -> str:
        """Of the recipe's content (what it declares), not of its comments or layout."""
        content = {
            "name": self.name,
            "release": self.release.name,
            "arches": [a.value for a in self.arches],
            "profile": self.profile,
            "packages": list(self.packages),
            "files": [[f.src, f.dest, f.mode] for f in self.files],
            "run": list(self.run),
            "size": self.disk_size,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def specs(self, mirror: str, arches: tuple[Arch, ...] = ()) -> list[BuildSpec]:
        """One BuildSpec per architecture (arches: instead of the recipe's own).

        Raises:
            RecipeError: a `files:` map has no source for an architecture built.
        """
        out = []
        for arch in arches or self.arches:
            adds = []
            for f in self.files:
                src = f.src_for(arch)
                if src is None:
                    raise RecipeError(
                        f"{self.where(f.line)}: no source for {arch.value} in this file's src map",
                        hint=f"add `{arch.value}: PATH` to it, or build other architectures",
                    )
                adds.append(AddedFile(self.path.parent / src, f.dest, f.mode))
            out.append(
                BuildSpec(
                    release=self.release,
                    arch=arch,
                    profile=self.profile,
                    packages=self.packages,
                    adds=tuple(adds),
                    disk_size=self.disk_size,
                    mirror=mirror,
                    variant=self.name,
                    commands=self.run,
                    recipe=self.text,
                    recipe_sha256=self.sha256,
                )
            )
        return out


def parse_recipe(text: str, path: Path) -> Recipe:
    """The recipe in text (read from path).

    Raises:
        RecipeError: `PATH:LINE[:COLUMN]: what is wrong`, with a hint.
    """
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: the recipe is over 1 MiB", hint="a recipe names files; it is small"
        )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(
            f"{at}: not valid YAML: {e.problem or e.context}",
            hint="check the indentation and quoting there",
        ) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}", hint="check the file") from None
    if root is None:
        raise RecipeError(
            f"{path}: the recipe is empty", hint="start with `base: {release: debian-12}`"
        )
    return _Reader(path).recipe(root, text)


class _Reader:
    """Walks the YAML nodes, so every value keeps its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key_lines: dict[int, int] = {}  # id(value node) -> the line of its key

    def fail(self, node: yaml.Node, what: str, hint: str) -> RecipeError:
        """An error at node's line (a mapping value's: its key's, where a block starts)."""
        line = self.key_lines.get(id(node), node.start_mark.line + 1)
        return RecipeError(f"{self.path}:{line}: {what}", hint=hint)

    def mapping(self, node: yaml.Node, what: str, keys: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping", hint=f"keys: {', '.join(keys)}")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key not in keys:
                raise self.fail(
                    k, f"unknown key {str(key)[:40]!r} in {what}", hint=f"keys: {', '.join(keys)}"
                )
            if key in out:
                raise self.fail(k, f"{key!r} is given twice in {what}", hint="keep one")
            out[key] = v
            self.key_lines[id(v)] = k.start_mark.line + 1
        return out

    def text(self, node: yaml.Node, what: str, hint: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.fail(node, f"{what} must be a single value", hint=hint)
        value = str(node.value).strip()
        if not value:
            raise self.fail(node, f"{what} is empty", hint=hint)
        return value

    def texts(self, node: yaml.Node, what: str, hint: str) -> list[tuple[str, yaml.Node]]:
        """A value or a list of values, each with its node."""
        if isinstance(node, yaml.SequenceNode):
            return [(self.text(n, f"each of {what}", hint), n) for n in node.value]
        return [(self.text(node, what, hint), node)]

    def checked(self, node: yaml.Node, call: Any, *args: Any) -> Any:
        """call(*args), its BadInput turned into a RecipeError at node's line."""
        try:
            return call(*args)
        except BadInput as e:
            raise self.fail(node, e.message, hint=e.hint or "") from None

    def recipe(self, root: yaml.Node, text: str) -> Recipe:
        top = self.mapping(root, "the recipe", _TOP)
        if "base" not in top:
            raise self.fail(root, "the recipe has no base", hint="base: {release: debian-12}")
        base = self.mapping(top["base"], "base", _BASE)
        if "release" not in base:
            raise self.fail(top["base"], "base has no release", hint="release: debian-12")
        release = self.checked(
            base["release"], parse_release, self.text(base["release"], "release", "debian-12")
        )
        arches = self.arches(base.get("arch"))
        profile = DEFAULT_PROFILE
        if "profile" in base:
            profile = self.text(base["profile"], "profile", ", ".join(PROFILES))
            if profile not in PROFILES:
                raise self.fail(
                    base["profile"], f"unknown profile {profile!r}", hint=", ".join(PROFILES)
                )
        name = self.name(top.get("name"), profile)
        size = self.size(top["size"]) if "size" in top else DEFAULT_DISK_SIZE
        packages = self.packages(top["packages"]) if "packages" in top else ()
        files = self.files(top["files"]) if "files" in top else ()
        run = self.commands(top["run"]) if "run" in top else ()
        for f in files:
            missing = [a.value for a in arches if f.src_for(a) is None]
            if missing:
                raise RecipeError(
                    f"{self.path}:{f.line}: this file's src map has no {', '.join(missing)}",
                    hint="name a source for every arch the recipe builds",
                )
        return Recipe(self.path, text, name, release, arches, profile, packages, files, run, size)

    def arches(self, node: yaml.Node | None) -> tuple[Arch, ...]:
        if node is None:
            return (Arch.AMD64,)
        out: list[Arch] = []
        for value, n in self.texts(node, "arch", "amd64, or a list: [amd64, arm64]"):
            try:
                arch = Arch.parse(value)
            except ValueError as e:
                raise self.fail(n, str(e), hint="Debian's names: amd64, arm64, ...") from None
            if arch in out:
                raise self.fail(n, f"arch {arch.value} is listed twice", hint="keep one")
            out.append(arch)
        if not out:
            raise self.fail(node, "arch lists nothing", hint="arch: [amd64]")
        return tuple(out)

    def name(self, node: yaml.Node | None, profile: str) -> str:
        if node is None:
            return ""
        hint = "a letter, then up to 31 lowercase letters, digits or dashes, e.g. gitlab"
        name = self.text(node, "name", hint)
        self.checked(node, parse_variant, name)
        if name in PROFILES and name != profile:
            raise self.fail(
                node, f"name {name!r} is a profile, not this recipe's ({profile})", hint=hint
            )
        return "" if name == profile else name

    def size(self, node: yaml.Node) -> int:
        text = self.text(node, "size", "e.g. 4G or 8192M")
        try:
            size = parse_size(text)
        except (ValueError, KeyError):
            raise self.fail(
                node, f"size {text!r} does not parse", hint="e.g. 4G or 8192M"
            ) from None
        if size < MIN_DISK_SIZE:
            raise self.fail(node, f"size {text} is under 1 GiB", hint="size: 4G")
        return size

    def packages(self, node: yaml.Node) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, "packages must be a list", hint="packages: [jq, git-lfs]")
        out = []
        for n in node.value:
            pkg = self.text(n, "each package", "a Debian package name, e.g. jq")
            if not all(c.isalnum() or c in "+-.:=~" for c in pkg):
                raise self.fail(n, f"package name {pkg!r} is not valid", hint="Debian names")
            out.append(pkg)
        return tuple(out)

    def files(self, node: yaml.Node) -> tuple[RecipeFile, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, "files must be a list", hint="files: [{src: ..., dest: /...}]")
        return tuple(self.file(n) for n in node.value)

    def file(self, node: yaml.Node) -> RecipeFile:
        entry = self.mapping(node, "a files entry", _FILE)
        for key in ("src", "dest"):
            if key not in entry:
                raise self.fail(node, f"this files entry has no {key}", hint="src: F, dest: /F")
        src_node = entry["src"]
        src: str | tuple[tuple[str, str], ...]
        if isinstance(src_node, yaml.MappingNode):
            pairs = []
            for k, v in src_node.value:
                arch = self.checked(k, _arch_name, self.text(k, "an arch of src", "amd64"))
                pairs.append((arch, self.relative(v)))
            src = tuple(pairs)
        else:
            src = self.relative(src_node)
        dest = self.text(entry["dest"], "dest", "an absolute path in the image, e.g. /opt/x")
        if not dest.startswith("/") or ".." in Path(dest).parts:
            raise self.fail(
                entry["dest"], f"dest {dest!r} is not an absolute path in the image", hint="/opt/x"
            )
        mode = self.mode(entry["mode"]) if "mode" in entry else None
        return RecipeFile(src, dest, mode, node.start_mark.line + 1)

    def relative(self, node: yaml.Node) -> str:
        src = self.text(node, "src", "a path relative to the recipe's folder")
        if Path(src).is_absolute() or ".." in Path(src).parts:
            raise self.fail(
                node,
                f"src {src!r} is not inside the recipe's folder",
                hint="keep the files beside the recipe (a recipe in git names its inputs there)",
            )
        return src

    def mode(self, node: yaml.Node) -> int:
        text = self.text(node, "mode", "octal, quoted: '0755'")
        digits = text.removeprefix("0o")
        if not (3 <= len(digits) <= 4 and all(c in "01234567" for c in digits)):
            raise self.fail(node, f"mode {text!r} is not octal", hint="write mode: '0755'")
        return int(digits, 8)

    def commands(self, node: yaml.Node) -> tuple[str, ...]:
        hint = "run: ['useradd builder', 'echo done > /etc/built']"
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, "run must be a list of shell commands", hint=hint)
        return tuple(self.text(n, "each run command", hint) for n in node.value)


def _arch_name(text: str) -> str:
    try:
        return Arch.parse(text).value
    except ValueError as e:
        raise BadInput(str(e), hint="Debian's names: amd64, arm64, ...") from None
