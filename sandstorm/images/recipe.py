"""Image recipes: one TOML file per image in ``recipes/`` (``default.toml`` …), naming the
Debian packages it holds, the steps run in it at build time, and the languages it provides.

A recipe is read whole and checked before anything is built: a mistake is a
:class:`RecipeError` naming the file and the line. Its SHA-256 is recorded in the image's
manifest, so a changed recipe means a rebuilt image.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Final

import msgspec
from msgspec import Meta

__all__ = [
    "RECIPES_DIR",
    "Recipe",
    "RecipeError",
    "RecipeLanguage",
    "load_recipe",
    "parse_recipe",
    "recipe_names",
]

RECIPES_DIR: Final = Path(__file__).resolve().with_name("recipes")

_Word = Annotated[str, Meta(min_length=1, max_length=4096)]
_Argv = Annotated[list[_Word], Meta(min_length=1, max_length=64)]
# Debian package names (Debian policy §5.6.1), with an optional architecture qualifier.
_Package = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")]


class RecipeLanguage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A language the image provides."""

    name: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9+#_-]{0,31}$")]
    #: Runs in the image (chrooted) at build time and prints the version users know.
    version: _Argv
    #: Runs a program given as source text: the code is appended as one more argument.
    run: _Argv


class Recipe(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    packages: Annotated[list[_Package], Meta(min_length=1, max_length=4096)]
    #: Shell commands run in the image (chrooted, as root) once its packages are in.
    steps: Annotated[list[_Word], Meta(max_length=256)] = []
    languages: Annotated[list[RecipeLanguage], Meta(max_length=256)] = []
    #: Set from the file, not written in it.
    name: str = ""
    sha256: str = ""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names its file and line."""


_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def recipe_names(directory: Path = RECIPES_DIR) -> list[str]:
    """The images there are recipes for."""
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_recipe(name: str, directory: Path = RECIPES_DIR) -> Recipe:
    """The recipe of the image ``name``; raises :class:`RecipeError`."""
    if not _NAME_RE.fullmatch(name):
        raise RecipeError(f"invalid image name {name!r}: want [a-z0-9][a-z0-9._-]*")
    path = directory / f"{name}.toml"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(recipe_names(directory)) or "none"
        raise RecipeError(f"no recipe for image {name!r} (recipes: {known})") from None
    return parse_recipe(data, name=name, where=str(path))


def parse_recipe(data: bytes, *, name: str, where: str) -> Recipe:
    """A recipe from the bytes of its file; ``where`` names it in errors."""
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    try:
        recipe = msgspec.convert(raw, Recipe)
    except msgspec.ValidationError as exc:
        line = _line_of(text, str(exc))
        at = f"{where}, line {line}" if line else where
        raise RecipeError(f"{at}: {exc}") from None
    if recipe.name or recipe.sha256:
        raise RecipeError(f"{where}: name and sha256 come from the file, not from the recipe")
    seen: set[str] = set()
    for index, language in enumerate(recipe.languages):
        if language.name in seen:
            line = _line_of(text, f"at `$.languages[{index}].name`")
            at = f"{where}, line {line}" if line else where
            raise RecipeError(f"{at}: language {language.name!r} is given twice")
        seen.add(language.name)
    return msgspec.structs.replace(recipe, name=name, sha256=hashlib.sha256(data).hexdigest())


# "... - at `$.languages[1].run`" or "... unknown field `x` - at `$.languages[0]`".
_PATH_RE: Final = re.compile(r"at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`")
_FIELD_RE: Final = re.compile(r"field `([A-Za-z_][A-Za-z0-9_]*)`")


def _line_of(text: str, message: str) -> int | None:
    """The line (from 1) of the value a validation message points at, found in the text: the
    key's line within its table (``[[languages]]`` counted in order), or the table's."""
    match = _PATH_RE.search(message)
    if match is None:
        return None
    parts = re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", match.group(1))
    field = _FIELD_RE.search(message)
    keys: list[str | int] = [key or int(index) for key, index in parts]
    if field is not None and "unknown field" in message:
        keys.append(field.group(1))
    lines = text.splitlines()
    start, end = 0, len(lines)
    table: str | None = None
    for key in keys:
        if isinstance(key, int):
            if table is None:
                return None
            headers = [
                i for i in range(start, end) if re.match(rf"\s*\[\[\s*{table}\s*\]\]", lines[i])
            ]
            if not headers:  # an item of an inline array: the key's own line
                break
            if key >= len(headers):
                return None
            start = headers[key]
            later = [i for i in range(start + 1, end) if re.match(r"\s*\[", lines[i])]
            end = later[0] if later else end
            continue
        table = key
        found = [i for i in range(start, end) if re.match(rf"\s*{re.escape(key)}\s*=", lines[i])]
        if found:
            start = found[0]
    return start + 1 if keys else None
