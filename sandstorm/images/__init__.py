"""Sandbox images: Debian root filesystems built locally with mmdebstrap, and their manifests."""

from .builder import (
    DEBIAN_SUITE,
    DEFAULT_IMAGE,
    DEFAULT_MIRROR,
    IMAGE_PACKAGES,
    SANDBOX_GID,
    SANDBOX_UID,
    ImageBuildError,
    ImageError,
    ImageManifest,
    LanguageInfo,
    build_image,
    find_apt_mirror,
    image_dir,
    image_rootfs,
    load_manifest,
)

__all__ = [
    "DEBIAN_SUITE",
    "DEFAULT_IMAGE",
    "DEFAULT_MIRROR",
    "IMAGE_PACKAGES",
    "SANDBOX_GID",
    "SANDBOX_UID",
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
