"""The docs in the repository stay true to the code (docs/architecture.md, docs/facts/).

- The folder map lists every folder of the four packages, with the floor tests/test_layers.py
  gives it; the picture exists.
- Every repository path and `file.py::name` the docs mention exists; every link between docs
  resolves; every docs/ path mentioned in the code exists.
- Nothing points outside the repository to the old design notes.
- The README links resolve; it shows the architecture picture and the admin page's screenshot,
  and links every page of the operator and user guides (docs/operator/, docs/user/).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.test_layers import FLOORS, PACKAGES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ARCH = DOCS / "architecture.md"
PICTURE = DOCS / "architecture.svg"
PICTURE_SOURCE = DOCS / "architecture.dot"
# Where code, comments and docs live (tools/ holds only installed npm packages).
SCANNED = (*PACKAGES, "tests", "bench", "ci-templates", "docs")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {
    "",
    ".py",
    ".md",
    ".sh",
    ".toml",
    ".yml",
    ".yaml",
    ".html",
    ".js",
    ".css",
    ".dot",
    ".service",
    ".network",
    ".groovy",
}
# Built from parts so this file does not match itself.
OUTSIDE_NOTES = re.compile("(DESIGN|CONTRACTS)" + r"\.md")
REPO_TOPS = (*PACKAGES, "tests", "bench", "ci-templates", "docs")


def _text_files() -> list[Path]:
    out = [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]
    for top in SCANNED:
        for p in (ROOT / top).rglob("*"):
            if (
                p.is_file()
                and "__pycache__" not in p.parts
                and (p.suffix in TEXT_SUFFIXES or p.name == "Jenkinsfile")
            ):
                out.append(p)
    return sorted(out)


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _folder_map() -> dict[str, str]:
    """Folder -> floor cell ("0".."9", or "—" for folders without Python)."""
    rows = {}
    for line in _section(ARCH.read_text(), "Folder map").splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            rows[m[1].rstrip("/")] = m[2]
    return rows


def _package_folders() -> set[str]:
    return {
        _rel(d)
        for pkg in PACKAGES
        for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")]
        if d.is_dir() and "__pycache__" not in d.parts
    }


def test_folder_map_lists_every_folder() -> None:
    listed, folders = set(_folder_map()), _package_folders()
    assert folders - listed == set(), "add these folders to docs/architecture.md's folder map"
    assert listed - folders == set(), "these folders in docs/architecture.md no longer exist"


def test_folder_map_floors_are_the_layer_tests() -> None:
    rows = _folder_map()
    wrong = {f: (rows.get(f), floor) for f, floor in FLOORS.items() if rows.get(f) != str(floor)}
    assert not wrong, f"docs/architecture.md floor != tests/test_layers.py floor: {wrong}"
    unfloored = {f for f, cell in rows.items() if f not in FLOORS and cell != "—"}
    assert not unfloored, f"folders without Python have no floor (—): {unfloored}"


def test_picture_exists_and_is_shown() -> None:
    assert PICTURE_SOURCE.is_file()
    root = ET.parse(PICTURE).getroot()  # noqa: S314 - our own file
    assert root.tag.endswith("svg")
    assert f"]({PICTURE.name})" in ARCH.read_text(), "architecture.md shows the picture"


README = ROOT / "README.md"
GUIDES = ("operator", "user")


def _doc_pages() -> list[Path]:
    """Every page of docs/, and the README (its paths and links are held to the same rules)."""
    return [*sorted(DOCS.rglob("*.md")), README]


def _defined(path: Path, name: str) -> bool:
    text = path.read_text()
    for part in name.split("."):
        pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(part)}\b|^{re.escape(part)}\s*[:=]"
        if not re.search(pattern, text, re.MULTILINE):
            return False
    return True


@pytest.mark.parametrize("page", _doc_pages(), ids=_rel)
def test_paths_in_docs_exist(page: Path) -> None:
    missing = []
    for ref in re.findall(r"`([\w./+-]+(?:::[\w.]+)?)`", page.read_text()):
        path, _, name = ref.partition("::")
        if "/" not in path or path.split("/")[0] not in REPO_TOPS:
            continue
        target = ROOT / path.rstrip("/")
        if not target.exists():
            missing.append(path)
        elif name and not _defined(target, name):
            missing.append(ref)
    assert not missing, (
        f"{_rel(page)} mentions what no longer exists (renamed or moved? update the page): "
        f"{missing}"
    )


@pytest.mark.parametrize("page", _doc_pages(), ids=_rel)
def test_links_in_docs_resolve(page: Path) -> None:
    broken = [
        link
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if "://" not in link and not (page.parent / link).exists()
    ]
    assert not broken, f"{_rel(page)} links to missing files: {broken}"


def test_docs_paths_in_code_exist() -> None:
    missing = sorted(
        {
            f"{_rel(p)}: {m}"
            for p in _text_files()
            for m in re.findall(r"\bdocs/[\w./-]*\w", p.read_text(errors="replace"))
            if not (ROOT / m).exists()
        }
    )
    assert not missing, f"code points to docs that do not exist: {missing}"


def test_nothing_points_outside_the_repository() -> None:
    found = [
        f"{_rel(p)}:{n}"
        for p in _text_files()
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_NOTES.search(line)
    ]
    assert not found, f"point to docs/ instead of the notes outside the repository: {found}"


def _readme_links() -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())


def test_readme_shows_the_pictures() -> None:
    links = _readme_links()
    for picture in ("docs/architecture.svg", "docs/admin.png"):
        assert picture in links, f"the README shows {picture}"
        assert (ROOT / picture).is_file()
    assert (DOCS / "admin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_links_every_guide_page() -> None:
    linked = {(ROOT / link).resolve() for link in _readme_links() if "://" not in link}
    pages = {p.resolve() for guide in GUIDES for p in (DOCS / guide).glob("*.md")}
    assert pages, "docs/operator/ and docs/user/ hold the guides"
    unlinked = sorted(_rel(p) for p in pages - linked)
    assert not unlinked, f"link these guide pages from the README: {unlinked}"
    # That every page the README links exists: test_links_in_docs_resolve[README.md].
