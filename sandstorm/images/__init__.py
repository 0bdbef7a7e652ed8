"""Sandbox images: Debian root filesystems built locally with mmdebstrap, and their manifests."""

from .builder import IMAGE_PACKAGES, SANDBOX_GID, SANDBOX_UID, build_image
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
    load_manifest,
)
from .statx_shim import STATX_SHIM_PATH

__all__ = [
    "DEBIAN_SUITE",
    "DEFAULT_IMAGE",
    "DEFAULT_MIRROR",
    "IMAGE_COMPAT",
    "IMAGE_PACKAGES",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "STATX_SHIM",
    "STATX_SHIM_PATH",
    "ImageBuildError",
    "ImageError",
    "ImageManifest",
    "LanguageInfo",
    "build_image",
    "find_apt_mirror",
    "image_dir",
    "image_rootfs",
    "load_manifest",
]
