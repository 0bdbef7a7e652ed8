"""Where images live and what ``image.json`` says about them.

An image lives at ``<data_dir>/images/<name>/`` as two entries:

``rootfs/``
    A Debian tree made by ``mmdebstrap``. Runtimes mount it read-only (gVisor puts a private,
    memory-backed overlay on top), so one copy backs every sandbox.
``image.json``
    An :class:`ImageManifest`: what was built, when, and the language versions *read from the
    image's own binaries*, which ``GET /v1/languages`` reports.

The manifest also lists the compatibility shims built into the rootfs (:data:`IMAGE_COMPAT`); an
image built without one of them counts as out of date.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import msgspec

from sandstorm.images.recipe import Recipe

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_COMPAT",
    "MANIFEST_NAME",
    "ROOTFS_NAME",
    "STATX_SHIM",
    "ImageBuildError",
    "ImageError",
    "ImageManifest",
    "LanguageInfo",
    "decode_manifest",
    "encode_manifest",
    "image_dir",
    "image_rootfs",
    "images_root",
    "load_manifest",
]

DEFAULT_IMAGE: Final = "default"
#: The statx compatibility shim (:mod:`sandstorm.images.statx_shim`).
STATX_SHIM: Final = "statx-shim"
#: The compatibility shims every current image has; recorded in the manifest's ``compat``.
IMAGE_COMPAT: Final[tuple[str, ...]] = (STATX_SHIM,)

MANIFEST_NAME: Final = "image.json"
ROOTFS_NAME: Final = "rootfs"

# Image names become directory names; keep them boring.
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class ImageError(Exception):
    """An image is missing, unreadable or could not be made."""


class ImageBuildError(ImageError):
    """Building an image failed; the message ends with the tail of the failing tool's stderr."""


class LanguageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One language the image can run.

    ``argv_prefix`` is the command that runs a program given as source text: the agent appends
    the code as one more argument (``["/usr/bin/python3", "-c"] + [code]``).
    """

    name: str
    version: str
    argv_prefix: tuple[str, ...]


class ImageManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What ``image.json`` records about a built image."""

    name: str
    created_at: str
    """RFC 3339 UTC, e.g. ``2026-11-26T07:03:00Z``."""
    debian_suite: str
    packages: tuple[str, ...]
    """The packages asked for on top of Debian's essential set."""
    languages: tuple[LanguageInfo, ...]
    size_bytes: int
    """Bytes of the rootfs (regular files, each hard link counted once)."""
    compat: tuple[str, ...] = ()
    """Compatibility shims built into the rootfs (:data:`IMAGE_COMPAT`); empty in manifests
    written before there were any."""
    recipe_sha256: str = ""
    """The SHA-256 of the recipe file it was built from; empty in manifests written before
    images had recipes."""

    def built_from(self, recipe: Recipe) -> bool:
        """Whether this image is what *recipe* builds. An image from before recipes counts as
        built from one that asks for exactly its packages and languages and no steps."""
        if self.recipe_sha256:
            return self.recipe_sha256 == recipe.sha256
        return (
            tuple(recipe.packages) == self.packages
            and not recipe.steps
            and [lang.name for lang in recipe.languages] == [lang.name for lang in self.languages]
        )

    def is_current(self) -> bool:
        """Whether the image has every shim this version of the builder installs."""
        return set(IMAGE_COMPAT) <= set(self.compat)

    def language(self, name: str) -> LanguageInfo | None:
        """The language called *name*, or None."""
        for lang in self.languages:
            if lang.name == name:
                return lang
        return None


_manifest_decoder: Final = msgspec.json.Decoder(ImageManifest)
_manifest_encoder: Final = msgspec.json.Encoder()


def encode_manifest(manifest: ImageManifest) -> bytes:
    """The manifest as pretty-printed JSON (it is read by humans too)."""
    return msgspec.json.format(_manifest_encoder.encode(manifest), indent=2) + b"\n"


def decode_manifest(data: bytes | str) -> ImageManifest:
    """Parse ``image.json``; raises :class:`ImageError` when it is malformed."""
    try:
        return _manifest_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ImageError(f"invalid image manifest: {exc}") from exc


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid image name {name!r}: want [a-z0-9][a-z0-9._-]*, max 63 chars")
    return name


def images_root(data_dir: Path) -> Path:
    """``<data_dir>/images``."""
    return Path(data_dir) / "images"


def image_dir(data_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    """``<data_dir>/images/<name>``."""
    return images_root(data_dir) / _check_name(name)


def image_rootfs(data_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    """``<data_dir>/images/<name>/rootfs``, the directory a runtime uses as the sandbox's root."""
    return image_dir(data_dir, name) / ROOTFS_NAME


def load_manifest(data_dir: Path, name: str = DEFAULT_IMAGE) -> ImageManifest | None:
    """The manifest of a built image, or None when the image is not there.

    Synchronous and cheap (one small file read): meant for start-up. An image counts as built
    only when both ``image.json`` and ``rootfs/`` exist. A manifest that exists but cannot be
    parsed raises :class:`ImageError`.
    """
    directory = image_dir(data_dir, name)
    try:
        data = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"cannot read {directory / MANIFEST_NAME}: {exc}") from exc
    if not (directory / ROOTFS_NAME).is_dir():
        return None
    return decode_manifest(data)
