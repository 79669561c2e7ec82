"""Which kernel modules the initrd loads, in which order (pure: parses depmod's output)."""

from __future__ import annotations

from ttci.model.errors import ImageError

__all__ = ["load_order", "module_name", "parse_builtin", "parse_modules_dep"]


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (its path, the paths it depends on) from a modules.dep file."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[module_name(path)] = (path.strip(), deps.split())
    return out


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    deps: dict[str, tuple[str, list[str]]],
    builtin: set[str],
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> list[str]:
    """Module paths to insmod, dependencies first.

    Raises:
        ImageError: a required module is neither a module nor built in.
    """
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        name = by_path.get(path)
        if name is None:
            raise ImageError(f"modules.dep names {path} but has no entry for it")
        for dep in deps[name][1]:
            visit(dep)
        order.append(path)

    for name in required + optional:
        key = name.replace("-", "_")
        if key in deps:
            visit(deps[key][0])
        elif key not in builtin and name in required:
            raise ImageError(
                f"kernel has no module {name}",
                hint="pick a kernel package with virtio and ext4 support",
            )
    return order
