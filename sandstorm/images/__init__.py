"""Sandbox images: Debian root filesystems built locally with mmdebstrap from the recipes in
``recipes/``, and their manifests."""

from .builder import SANDBOX_GID, SANDBOX_UID, build_image
from .debian import DEBIAN_SUITE, DEFAULT_MIRROR, find_apt_mirror
from .manifest import (
    DEFAULT_IMAGE,
    IMAGE_COMPAT,
    STATX_SHIM,
    ImageBuildError,
    ImageError,
    ImageManifest,
    LanguageInfo,
    image_dir,
    image_rootfs,
    images_root,
    load_manifest,
)
from .recipe import Recipe, RecipeError, load_recipe, recipe_names
from .statx_shim import STATX_SHIM_PATH

__all__ = [
    "DEBIAN_SUITE",
    "DEFAULT_IMAGE",
    "DEFAULT_MIRROR",
    "IMAGE_COMPAT",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "STATX_SHIM",
    "STATX_SHIM_PATH",
    "ImageBuildError",
    "ImageError",
    "ImageManifest",
    "LanguageInfo",
    "Recipe",
    "RecipeError",
    "build_image",
    "find_apt_mirror",
    "image_dir",
    "image_rootfs",
    "images_root",
    "load_manifest",
    "load_recipe",
    "recipe_names",
]
