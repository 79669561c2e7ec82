"""Reading an image recipe file (hostd/builders/recipe.py parses it): the text, and every file
it names checked to exist, each error with the recipe's line."""

from __future__ import annotations

from pathlib import Path

from hostd.builders.recipe import MAX_RECIPE_BYTES, Recipe, RecipeError, parse_recipe

__all__ = ["load_recipe"]


def load_recipe(path: Path) -> Recipe:
    """The recipe at path, its sources checked for every arch it builds.

    Raises:
        RecipeError: unreadable, malformed (`PATH:LINE: ...`), or a source that is missing.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(
            f"cannot read the recipe {path}: {e.strerror}", hint="check the path"
        ) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason})", hint="save it as UTF-8") from None
    recipe = parse_recipe(text, path)
    for f in recipe.files:
        for arch in recipe.arches:
            src = f.src_for(arch)
            if src is not None and not (path.parent / src).exists():
                raise RecipeError(
                    f"{recipe.where(f.line)}: {src} does not exist (beside the recipe: "
                    f"{path.parent / src})",
                    hint="put the file there (it is yours to provide: see the recipe's comments)",
                )
    return recipe
