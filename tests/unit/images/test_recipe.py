"""Recipes: the shipped ones parse, and every mistake in one is refused naming its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandstorm.images import ImageManifest, LanguageInfo
from sandstorm.images.recipe import (
    RecipeError,
    load_recipe,
    parse_recipe,
    recipe_names,
)

GOOD = b"""\
packages = ["python3"]
steps = ["echo made > /etc/made"]

[[languages]]
name = "python"
version = ["python3", "--version"]
run = ["/usr/bin/python3", "-c"]
"""


def test_every_shipped_recipe_parses() -> None:
    assert "default" in recipe_names()
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.name == name and len(recipe.sha256) == 64
        assert recipe.packages and recipe.languages


def test_the_default_recipe_is_the_default_image() -> None:
    recipe = load_recipe("default")
    assert recipe.packages == ["python3", "nodejs", "bash", "coreutils"]
    assert [(lang.name, lang.run) for lang in recipe.languages] == [
        ("python", ["/usr/bin/python3", "-c"]),
        ("javascript", ["/usr/bin/node", "-e"]),
        ("bash", ["/bin/bash", "-c"]),
        ("sh", ["/bin/sh", "-c"]),
    ]


def test_a_recipe_is_named_by_its_file_and_hashed() -> None:
    recipe = parse_recipe(GOOD, name="mine", where="mine.toml")
    assert (recipe.name, recipe.steps) == ("mine", ["echo made > /etc/made"])
    other = parse_recipe(GOOD.replace(b"made", b"done"), name="mine", where="mine.toml")
    assert recipe.sha256 != other.sha256


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace(b'run = ["/usr/bin/python3", "-c"]', b'run = "python3"'),
            "line 7: Expected `array`",
        ),
        (GOOD + b'compile = ["cc"]\n', "line 8: Object contains unknown field `compile`"),
        (
            GOOD.replace(b'"python3"]\nsteps', b'"Python 3"]\nsteps'),
            "line 1: Expected `str` matching",
        ),
        (GOOD + GOOD[GOOD.index(b"[[languages]]") :], "line 9: language 'python' is given twice"),
        (GOOD.replace(b'name = "python"', b'name = ""'), "line 5: Expected `str` matching"),
        (
            GOOD.replace(b'version = ["python3", "--version"]', b"version = []"),
            "line 6: Expected `array` of length >= 1",
        ),
        (b'packages = ["a"\n', "mine.toml: "),
        (b"packages = []\n", "line 1: Expected `array` of length >= 1"),
        (b'name = "x"\npackages = ["python3"]\n', "come from the file"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_mistakes_name_their_line(text: bytes, expected: str) -> None:
    with pytest.raises(RecipeError, match=r"^mine\.toml") as caught:
        parse_recipe(text, name="mine", where="mine.toml")
    assert expected in str(caught.value)


def test_an_unknown_or_invalid_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no recipe for image 'nothing'"):
        load_recipe("nothing", tmp_path)
    with pytest.raises(RecipeError, match="invalid image name"):
        load_recipe("../etc/passwd", tmp_path)


def _manifest(**fields: object) -> ImageManifest:
    base: dict[str, object] = {
        "name": "default",
        "created_at": "2026-11-26T07:03:00Z",
        "debian_suite": "bookworm",
        "packages": ("python3", "nodejs", "bash", "coreutils"),
        "languages": tuple(
            LanguageInfo(name=n, version="1", argv_prefix=("x",))
            for n in ("python", "javascript", "bash", "sh")
        ),
        "size_bytes": 1,
    }
    base.update(fields)
    return ImageManifest(**base)  # type: ignore[arg-type]


def test_an_image_is_current_for_the_recipe_it_was_built_from() -> None:
    recipe = load_recipe("default")
    assert _manifest(recipe_sha256=recipe.sha256).built_from(recipe)
    assert not _manifest(recipe_sha256="0" * 64).built_from(recipe)
    # Built before images had recipes: current for a recipe that asks for the same.
    assert _manifest().built_from(recipe)
    assert not _manifest(packages=("python3",)).built_from(recipe)
