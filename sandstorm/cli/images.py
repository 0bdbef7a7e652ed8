"""``sandstorm image build [NAME]`` and ``sandstorm image ls``: the images of a data dir, built
from the recipes in ``sandstorm/images/recipes/``."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import trio

from sandstorm.config import load_config
from sandstorm.images import ImageError, images_root, load_manifest, recipe_names

__all__ = ["add_commands", "main"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = sub.add_parser("image", help="build and list sandbox images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser(
        "build", help="build an image from its recipe (once, again when the recipe changes)"
    )
    build.add_argument(
        "name",
        nargs="?",
        default=None,
        help=f"the image (a recipe: {', '.join(recipe_names())}; default: the configured image)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if it is current")
    build.add_argument(
        "--vm",
        action="store_true",
        help="also build the VM guest (kernel, initramfs, ext4 root) for the qemu runtime",
    )
    listing = image_sub.add_parser("ls", help="the images built in the data dir")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    for command in (build, listing):
        command.add_argument("--data-dir", default=None)
        command.add_argument("--config", default=None)


def main(args: argparse.Namespace) -> int:
    """Raises ImageError (the caller reports it) and ConfigError."""
    config = load_config(args.config, data_dir=args.data_dir)
    data_dir = Path(config.data_dir)
    if args.image_command == "ls":
        return _list(data_dir, as_json=args.json)
    from sandstorm.images.builder import build_image

    name = args.name or config.image
    manifest = trio.run(lambda: build_image(data_dir, name=name, force=args.force))
    for lang in manifest.languages:
        print(f"{lang.name} {lang.version}")
    if args.vm:
        from sandstorm.images.vm import build_vm_image

        vm = trio.run(lambda: build_vm_image(data_dir, name=name, force=args.force))
        print(f"vm kernel {vm.kernel_version}")
    return 0


class _Row(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    recipe_sha256: str | None
    size_bytes: int
    created_at: str
    languages: list[dict[str, str]]
    vm: bool


def _list(data_dir: Path, *, as_json: bool) -> int:
    from sandstorm.images.vm import load_vm_manifest

    rows: list[_Row] = []
    root = images_root(data_dir)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith("."):
            continue  # a build in progress, or what one left
        try:
            manifest = load_manifest(data_dir, entry.name)
        except (ImageError, ValueError):
            continue
        if manifest is None:
            continue
        rows.append(
            _Row(
                name=manifest.name,
                recipe_sha256=manifest.recipe_sha256 or None,
                size_bytes=manifest.size_bytes,
                created_at=manifest.created_at,
                languages=[{"name": x.name, "version": x.version} for x in manifest.languages],
                vm=load_vm_manifest(data_dir, manifest.name) is not None,
            )
        )
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(rows), indent=1).decode())
        return 0
    for row in rows:
        languages = " ".join(f"{x['name']}-{x['version']}" for x in row.languages)
        vm = " vm" if row.vm else ""
        print(f"{row.name:<16} {row.size_bytes / 1e6:>8.0f} MB {row.created_at}{vm}  {languages}")
    return 0
