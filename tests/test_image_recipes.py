"""Image recipes as files: the schema with line-numbered errors, the recipe's hash as part of the
image's identity, the shipped recipes, and (image/vm tiers) a real build of a tiny recipe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostd.builders.recipe import RecipeError, parse_recipe
from hostd.images.guest_files import digest_adds, digest_files, guest_files, install_files
from hostd.images.recipes import load_recipe
from ttci.model.arch import Arch
from ttci.model.manifest import Manifest
from ttci.model.naming import ImageName, parse_target

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "ci-templates" / "recipes"
BIN = Path(sys.executable).parent

TINY = """\
# a tiny recipe: one package, one file, one command
name: tiny
base:
  release: debian-12
  arch: amd64
packages: [jq]
files:
  - src: hello.txt
    dest: /etc/tt-hello.txt
    mode: "0600"
run:
  - echo "built by $(id -un) on $(uname -m)" > /etc/tt-recipe-ran
size: 3G
"""


def _recipe(tmp_path: Path, text: str = TINY) -> Path:
    (tmp_path / "hello.txt").write_text("hello from a recipe\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_a_recipe_declares_the_build(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    (spec,) = recipe.specs("http://mirror.test/debian")
    assert str(spec.name) == "qemu:debian-12+tiny:amd64"
    assert spec.packages == ("jq",) and "jq" in spec.all_packages()
    (add,) = spec.adds
    assert add.src == tmp_path / "hello.txt" and add.dest == "/etc/tt-hello.txt"
    assert add.mode == 0o600
    assert spec.commands == ('echo "built by $(id -un) on $(uname -m)" > /etc/tt-recipe-ran',)
    assert spec.disk_size == 3 << 30 and spec.mirror == "http://mirror.test/debian"
    assert spec.recipe == TINY and spec.recipe_sha256 == recipe.sha256
    # Jobs ask for it with the grammar they already use.
    assert parse_target("debian-12+tiny:amd64").image() == spec.name
    assert ImageName.parse(str(spec.name)) == spec.name


def _key(text: str, tmp_path: Path) -> str:
    (spec,) = load_recipe(_recipe(tmp_path, text)).specs("http://m")
    return spec.inputs_key(digest_files(guest_files(spec.profile)), digest_adds(spec))


def test_the_recipe_hash_is_part_of_the_image_identity(tmp_path: Path) -> None:
    base = parse_recipe(TINY, Path("a.yaml"))
    # Comments, layout and flow style do not change what a recipe declares.
    relaid = "name: tiny  # same\nbase: {release: debian-12, arch: [amd64]}\npackages:\n  - jq\n"
    relaid += 'files: [{src: hello.txt, dest: /etc/tt-hello.txt, mode: "600"}]\n'
    relaid += (
        "run: ['echo \"built by $(id -un) on $(uname -m)\" > /etc/tt-recipe-ran']\nsize: 3072M\n"
    )
    assert parse_recipe(relaid, Path("b.yaml")).sha256 == base.sha256
    key = _key(TINY, tmp_path)
    assert _key(relaid, tmp_path) == key
    # What it declares does: a command, a mode, a name.
    for old, new in (("echo", "printf"), ('"0600"', '"0644"'), ("name: tiny", "name: tiny2")):
        changed = TINY.replace(old, new)
        assert parse_recipe(changed, Path("c.yaml")).sha256 != base.sha256, new
        assert _key(changed, tmp_path) != key, new
    # So does a file it names (through the added files' digest).
    (tmp_path / "hello.txt").write_text("other\n")
    (spec,) = load_recipe(tmp_path / "tiny.yaml").specs("http://m")
    assert spec.inputs_key(digest_files(guest_files("agent")), digest_adds(spec)) != key


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("base:\n  release: debian-12\n packages: [x]\n", "3:2", "not valid YAML"),
        ("base: {release: debian-12}\npakages: [jq]\n", "2", "unknown key 'pakages'"),
        ("packages: [jq]\n", "1", "has no base"),
        ("base:\n  arch: amd64\n", "1", "base has no release"),
        ("base:\n  release: debian-99\n", "2", "unknown release"),
        ("base:\n  release: debian-12\n  arch: [amd64, sparc]\n", "3", "unknown architecture"),
        ("base:\n  release: debian-12\n  profile: gui\n", "3", "unknown profile"),
        ("base: {release: debian-12}\npackages: jq\n", "2", "packages must be a list"),
        ("base: {release: debian-12}\npackages: [jq, 'a b']\n", "2", "not valid"),
        ("base: {release: debian-12}\nsize: 512M\n", "2", "under 1 GiB"),
        ("base: {release: debian-12}\nsize: lots\n", "2", "does not parse"),
        ("base: {release: debian-12}\nname: 9lives\n", "2", "neither a profile nor"),
        ("base: {release: debian-12}\nname: systemd\n", "2", "is a profile"),
        ("base: {release: debian-12}\nrun: echo hi\n", "2", "list of shell commands"),
        ("base: {release: debian-12}\nrun: [~]\n", "2", "must be a single value"),
        ("base: {release: debian-12}\nfiles:\n  - dest: /x\n", "3", "has no src"),
        ("base: {release: debian-12}\nfiles:\n  - {src: a, dest: x}\n", "3", "not an absolute"),
        ("base: {release: debian-12}\nfiles:\n  - {src: ../a, dest: /x}\n", "3", "not inside"),
        ("base: {release: debian-12}\nfiles:\n  - {src: a, dest: /x, mode: rw}\n", "3", "octal"),
        (
            "base: {release: debian-12, arch: [amd64, arm64]}\nfiles:\n"
            "  - src: {amd64: a}\n    dest: /x\n",
            "3",
            "has no arm64",
        ),
        ("base: {release: debian-12}\nbase: {release: debian-13}\n", "2", "given twice"),
        ("- base\n", "1", "must be a mapping"),
        ("", "", "is empty"),
    ],
)
def test_bad_recipes_are_refused_with_their_line(text: str, line: str, says: str) -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, Path("r.yaml"))
    assert e.value.message.startswith(f"r.yaml:{line}: " if line else "r.yaml: "), e.value.message
    assert says in e.value.message and e.value.hint


def test_a_missing_file_is_named_with_its_line(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    (tmp_path / "hello.txt").unlink()
    with pytest.raises(RecipeError, match=r"tiny\.yaml:8: hello\.txt does not exist"):
        load_recipe(path)


def test_the_shipped_recipes_parse_and_name_the_files_operators_provide() -> None:
    for name, image in (("gitlab", "qemu:debian-12+gitlab"), ("github", "qemu:debian-12+github")):
        path = RECIPES / f"{name}.yaml"
        recipe = parse_recipe(path.read_text(), path)
        specs = recipe.specs("http://m")
        assert [str(s.name) for s in specs] == [f"{image}:amd64", f"{image}:arm64"]
        for spec in specs:
            (add,) = spec.adds
            assert add.src.is_relative_to(RECIPES / "files"), add.src
        assert recipe.run
        # Without the operator's files a build says which line wants which file.
        with pytest.raises(RecipeError, match=rf"{name}\.yaml:\d+: files/"):
            load_recipe(path)


def test_cli_builds_from_a_file_and_refuses_flags_the_recipe_owns(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    r = subprocess.run(
        [str(BIN / "tt"), "image", "build", "-f", str(path), "--package", "vim"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--package cannot be added" in r.stderr, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  release: debian-12\n  arch: [amd64, sparc]\n")
    r = subprocess.run(
        [str(BIN / "tt"), "image", "build", "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and f"{bad}:3: unknown architecture 'sparc'" in r.stderr, r.stderr


def test_added_files_get_the_recipes_mode(tmp_path: Path) -> None:
    (spec,) = load_recipe(_recipe(tmp_path)).specs("http://m")
    root = tmp_path / "root"
    install_files(root, spec, {})
    target = root / "etc/tt-hello.txt"
    assert target.read_text() == "hello from a recipe\n"
    assert target.stat().st_mode & 0o7777 == 0o600


def test_the_manifest_carries_the_recipe_and_a_content_digest() -> None:
    from hostd.builders.recipe import Recipe

    recipe: Recipe = parse_recipe(TINY, Path("t.yaml"))
    m = _manifest(recipe=TINY, recipe_sha256=recipe.sha256, run_commands=recipe.run)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.recipe == TINY and again.recipe_sha256 == recipe.sha256
    assert again.digest == m.digest and len(m.digest) == 64
    # A manifest written before recipes existed still reads (no recipe).
    old = {k: v for k, v in m.to_dict().items() if k not in ("recipe", "recipe_sha256")}
    assert Manifest.from_dict(old).recipe == ""
    # The digest is of the files: a changed sha256 changes it, a changed note does not.
    from dataclasses import replace

    from ttci.model.manifest import FileEntry

    assert replace(m, notes=("x",)).digest == m.digest
    assert replace(m, initrd=FileEntry("initrd.img", 10, "0" * 64)).digest != m.digest


def _manifest(**kw: object) -> Manifest:
    from ttci.model.manifest import FileEntry

    base = dict(
        name="qemu:debian-12+tiny:amd64",
        os="debian",
        release="debian-12",
        suite="bookworm",
        arch=Arch.AMD64.value,
        profile="agent",
        kernel_version="6.1",
        kernel_cmdline="root=/dev/vda",
        kernel=FileEntry("vmlinuz", 10, "a" * 64),
        initrd=FileEntry("initrd.img", 10, "b" * 64),
        disk=FileEntry("disk.qcow2", 10, "c" * 64),
        disk_virtual_size=3 << 30,
        built_at="2026-01-01T00:00:00+00:00",
        inputs_key="k",
        agent_protocol=1,
    )
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


@pytest.mark.image
@pytest.mark.vm
def test_a_tiny_recipe_builds_and_boots(tmp_path: Path) -> None:
    """A real build (amd64; the kernel tree from the build cache, a rootfs with jq), then a
    boot: the package, the file with its mode and the command's result are in the image."""
    import time

    from hostd.images.build import Builder
    from hostd.images.catalogue import find
    from hostd.vm.direct_vm import boot
    from tests.conftest import CACHE_DIR

    images, src = tmp_path / "images", tmp_path / "src"
    src.mkdir()
    (spec,) = load_recipe(_recipe(src)).specs("http://deb.debian.org/debian")
    t0 = time.monotonic()
    ((manifest, built),) = Builder(images, CACHE_DIR).build_many([spec])
    took = time.monotonic() - t0
    print(f"\ntiny recipe built in {took:.1f} s")
    assert built and manifest.name == "qemu:debian-12+tiny:amd64"
    assert manifest.recipe == TINY and manifest.recipe_sha256 == spec.recipe_sha256
    assert manifest.run_commands == spec.commands
    assert any(p.startswith(("jq=", "jq:amd64=")) for p in manifest.packages)
    # Unchanged recipe: not rebuilt.
    ((_, again),) = Builder(images, CACHE_DIR).build_many([spec])
    assert not again
    image = find(images, "debian-12+tiny")
    with boot(image.manifest, image.path) as vm, vm.connect() as agent:
        script = "cat /etc/tt-recipe-ran; stat -c %a /etc/tt-hello.txt; echo '{}' | jq -c ."
        status, out, err = agent.output(["sh", "-c", script])
    assert status.ok, err
    assert out.decode().splitlines() == ["built by root on x86_64", "600", "{}"]


def test_recipe_text_in_the_test_is_what_the_docs_show() -> None:
    """The README of the recipes folder shows the schema this module parses."""
    readme = (RECIPES / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(textwrap.dedent(block), RECIPES / "example.yaml")
    assert recipe.name == "gitlab" and recipe.arches == (Arch.AMD64, Arch.ARM64)
    assert recipe.files[0].src_for(Arch.ARM64) == "bin/tool-arm64"
