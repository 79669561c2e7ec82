"""The layering of the code, checked from the folders themselves (docs/architecture.md).

Every folder of the four packages has a floor; a module may import its own folder and folders on
lower floors of its own package or of ttci's shared ground (model, wire, infra, client). Nothing
on the host imports the guest agent (it runs inside VMs; its launcher is copied into images).
Pure folders import no I/O library and only other pure folders. A new folder must be given a
floor here, so nothing can slip in unclassified.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ttci", "hostd", "runner_executor", "webhooks")

# folder -> floor. Lower floors never import higher ones.
FLOORS = {
    "ttci": 0,  # only __init__.py (the version), which the guest agent also imports
    "ttci/model": 1,
    "ttci/wire": 2,
    "ttci/agent": 3,
    "ttci/infra": 3,
    "ttci/client": 4,
    "ttci/scheduler/planning": 4,
    "ttci/scheduler": 5,
    "ttci/scheduler/admin": 6,
    "ttci/scheduler/web": 7,
    "ttci/cli": 9,
    "hostd": 0,
    "hostd/builders": 4,
    "hostd/images": 5,
    "hostd/net": 5,
    "hostd/storage": 5,
    "hostd/cache": 5,
    "hostd/vm": 6,
    "hostd/service": 7,
    "hostd/cli": 8,
    "runner_executor": 7,
    "runner_executor/core": 4,
    "webhooks": 7,
    "webhooks/core": 4,
}
PURE = {
    "ttci/model",
    "ttci/wire",
    "ttci/scheduler/planning",
    "hostd/builders",
    "runner_executor/core",
    "webhooks/core",
}
# What any package may use of ttci: its shared ground. The scheduler, the CLI and the agent are
# ttci's own floors; hostd and the CI plugins talk to them over HTTP, never by import.
SHARED_GROUND = {"ttci", "ttci/model", "ttci/wire", "ttci/infra", "ttci/client"}
# Libraries that do I/O (or pull in a framework): never in a pure folder.
IO_LIBRARIES = {
    "subprocess",
    "socket",
    "sqlite3",
    "sqlite_utils",
    "requests",
    "urllib3",
    "http",
    "libvirt",
    "pyroute2",
    "flask",
    "werkzeug",
    "waitress",
    "gitlab",
    "github",
    "rich",
    "prometheus_client",
    "threading",
    "shutil",
    "tempfile",
}
GUEST_FOLDERS = {"ttci/agent"}
GUEST_FILES = {"ttci/__init__.py", "ttci/wire/__init__.py", "ttci/wire/agent_protocol.py"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    # hostd/guest holds files copied into images (the agent's launcher), not host modules.
    return sorted(
        p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if not p.is_relative_to(ROOT / "hostd/guest")
    )


def _folder(path: Path) -> str:
    return path.parent.relative_to(ROOT).as_posix()


def _module_folder(module: str) -> str | None:
    """The folder a dotted module lives in (a package counts as its own folder)."""
    rel = Path(*module.split("."))
    if (ROOT / rel).is_dir():
        return rel.as_posix()
    if (ROOT / rel).with_suffix(".py").is_file():
        return rel.parent.as_posix()
    return None


def _imports(path: Path) -> set[str]:
    """Absolute module names imported (`from a import b` counts a.b when b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if _module_folder(sub) is not None and sub.split(".", maxsplit=1)[0] in PACKAGES:
                    found.add(sub)
    return found


def _ours(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] in PACKAGES


def _allowed(src: str, dst: str) -> bool:
    if dst == src:
        return True
    if dst in GUEST_FOLDERS:
        return False
    if src.split("/", maxsplit=1)[0] != dst.split("/", maxsplit=1)[0] and dst not in SHARED_GROUND:
        return False
    return FLOORS[dst] < FLOORS[src]


MODULES = _modules()


def test_every_folder_has_a_floor() -> None:
    folders = {_folder(p) for p in MODULES}
    assert folders <= set(FLOORS), f"give these folders a floor: {sorted(folders - set(FLOORS))}"
    assert set(FLOORS) <= folders, f"no longer exist: {sorted(set(FLOORS) - folders)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_go_down(path: Path) -> None:
    src = _folder(path)
    bad = []
    for mod in _imports(path):
        if not _ours(mod):
            continue
        dst = _module_folder(mod)
        assert dst is not None, f"{path.name} imports {mod}, which does not exist"
        if not _allowed(src, dst):
            bad.append(f"{mod} ({dst}, floor {FLOORS[dst]})")
    assert not bad, f"{src} (floor {FLOORS[src]}) may not import {bad}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if _folder(p) in PURE],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_pure_folders_do_no_io(path: Path) -> None:
    mods = _imports(path)
    io = {m for m in mods if m.split(".")[0] in IO_LIBRARIES}
    impure = {m for m in mods if _ours(m) and _module_folder(m) not in PURE | {"ttci"}}
    assert not io, f"{path.name} imports I/O libraries {io}"
    assert not impure, f"{path.name} imports folders that do I/O: {impure}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if _folder(p) in GUEST_FOLDERS]
    + [ROOT / f for f in sorted(GUEST_FILES)]
    + [ROOT / "hostd/guest/tt-agent.py"],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_guest_code_is_stdlib_only(path: Path) -> None:
    allowed = {
        "ttci",
        "ttci.wire",
        "ttci.wire.agent_protocol",
        "ttci.agent.main",
        "ttci.agent.process",
    }
    bad = {
        m
        for m in _imports(path)
        if (m.split(".")[0] not in sys.stdlib_module_names or _ours(m)) and m not in allowed
    }
    assert not bad, f"the guest image has no venv: {path.name} imports {bad}"


def test_guest_files_are_what_the_image_builder_copies() -> None:
    from hostd.images.guest_files import AGENT_MODULES

    shipped = {f"ttci/{m}" for m in AGENT_MODULES}
    needed = GUEST_FILES | {
        p.relative_to(ROOT).as_posix() for p in MODULES if _folder(p) in GUEST_FOLDERS
    }
    assert shipped == needed


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_and_functions_are_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by concern"
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n.end_lineno or n.lineno) - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.name != "__init__.py" and not p.name.startswith("_")],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_public_modules_declare_all(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = [
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    ]
    assert "__all__" in names, f"{path.relative_to(ROOT)} declares no __all__"


def test_layer_rules_catch_an_upward_import() -> None:
    """The rules themselves: a few imports that must be refused and allowed."""
    assert not _allowed("ttci/model", "ttci/infra")
    assert not _allowed("ttci/infra", "ttci/scheduler")
    assert not _allowed("hostd/vm", "ttci/scheduler")
    assert not _allowed("ttci/cli", "hostd/images")
    assert not _allowed("webhooks", "runner_executor")
    assert not _allowed("hostd/builders", "hostd/vm")
    assert _allowed("hostd/vm", "hostd/builders")
    assert _allowed("ttci/scheduler/admin", "ttci/scheduler")
    assert not _allowed("ttci/scheduler", "ttci/scheduler/admin")
    assert not _allowed("ttci/scheduler/planning", "ttci/scheduler")
    assert not _allowed("ttci/client", "ttci/agent")
    assert _allowed("webhooks", "ttci/client")
    assert _allowed("ttci/cli", "ttci/scheduler/planning")
