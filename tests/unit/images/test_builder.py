"""Pure parts of the image builder: apt sources, the mmdebstrap command, the manifest format."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sandstorm.images import DEFAULT_MIRROR, ImageError, ImageManifest, LanguageInfo
from sandstorm.images.builder import mmdebstrap_command
from sandstorm.images.debian import (
    find_apt_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
)
from sandstorm.images.manifest import (
    decode_manifest,
    encode_manifest,
    image_dir,
    image_rootfs,
    load_manifest,
)
from sandstorm.images.recipe import load_recipe

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_deb822_picks_the_exact_suite() -> None:
    assert parse_deb822_sources(DEB822, "bookworm") == ["http://deb.debian.org/debian"]
    assert parse_deb822_sources(DEB822, "bookworm-security") == [
        "http://deb.debian.org/debian-security"
    ]
    assert parse_deb822_sources(DEB822, "trixie") == []


def test_deb822_skips_disabled_source_only_and_foreign_entries() -> None:
    text = """\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://download.docker.com/linux/debian
Suites: bookworm
Components: stable

Types: deb deb-src
URIs: cdrom:[Debian 12]/ http://mirror.example/debian
  https://second.example/debian
Suites: bookworm
Components: main contrib
"""
    assert parse_deb822_sources(text, "bookworm") == [
        "http://mirror.example/debian",
        "https://second.example/debian",
    ]


def test_deb822_field_names_are_case_insensitive_and_tabs_continue() -> None:
    text = "types: deb\nuris: http://a.example/debian\n\thttp://b.example/debian\n"
    text += "suites: bookworm\ncomponents: main\n"
    assert parse_deb822_sources(text) == ["http://a.example/debian", "http://b.example/debian"]


def test_one_line_sources() -> None:
    text = """\
# a comment
deb http://ftp.example.org/debian bookworm main contrib non-free-firmware
deb http://ftp.example.org/debian bookworm-updates main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable
deb [ signed-by=/k.gpg ] https://mirror.example/debian bookworm main  # trailing comment
deb cdrom:[Debian]/ bookworm main
deb http://ftp.example.org/debian bookworm main
"""  # noqa: E501
    assert parse_one_line_sources(text, "bookworm") == [
        "http://ftp.example.org/debian",
        "https://mirror.example/debian",
    ]
    assert parse_one_line_sources(text, "bookworm-updates") == ["http://ftp.example.org/debian"]
    assert parse_one_line_sources("", "bookworm") == []


def test_find_apt_mirror_order_and_fallback(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert find_apt_mirror(apt_dir=apt) == DEFAULT_MIRROR

    (apt / "sources.list").write_text("deb http://one-line.example/debian bookworm main\n")
    assert find_apt_mirror(apt_dir=apt) == "http://one-line.example/debian"

    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb822.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    assert find_apt_mirror(apt_dir=apt) == "http://deb822.example/debian"

    # Third-party .sources files are not Debian mirrors.
    (apt / "sources.list.d" / "debian.sources").unlink()
    (apt / "sources.list").unlink()
    (apt / "sources.list.d" / "docker.sources").write_text(
        "Types: deb\nURIs: https://download.docker.com/linux/debian\nSuites: bookworm\n"
        "Components: main\n"
    )
    assert find_apt_mirror(apt_dir=apt) == DEFAULT_MIRROR


def _manifest() -> ImageManifest:
    return ImageManifest(
        name="default",
        created_at="2026-11-26T07:03:00Z",
        debian_suite="bookworm",
        packages=("python3", "nodejs", "bash", "coreutils"),
        languages=(
            LanguageInfo(name="python", version="3.11.2", argv_prefix=("/usr/bin/python3", "-c")),
            LanguageInfo(name="sh", version="0.5.12", argv_prefix=("/bin/sh", "-c")),
        ),
        size_bytes=296_000_000,
    )


def test_manifest_round_trip() -> None:
    manifest = _manifest()
    data = encode_manifest(manifest)
    assert decode_manifest(data) == manifest
    as_json = msgspec.json.decode(data)
    assert as_json["languages"][0] == {
        "name": "python",
        "version": "3.11.2",
        "argv_prefix": ["/usr/bin/python3", "-c"],
    }
    assert manifest.language("sh") == manifest.languages[1]
    assert manifest.language("cobol") is None


def test_manifest_rejects_garbage() -> None:
    with pytest.raises(ImageError):
        decode_manifest(b"{not json")
    with pytest.raises(ImageError):
        decode_manifest(b'{"name": "default"}')


def test_load_manifest(tmp_path: Path) -> None:
    assert load_manifest(tmp_path) is None
    directory = image_dir(tmp_path, "default")
    directory.mkdir(parents=True)
    (directory / "image.json").write_bytes(encode_manifest(_manifest()))
    assert load_manifest(tmp_path) is None  # no rootfs yet: not a built image
    (directory / "rootfs").mkdir()
    assert load_manifest(tmp_path) == _manifest()
    assert image_rootfs(tmp_path, "default") == directory / "rootfs"
    (directory / "image.json").write_bytes(b"[]")
    with pytest.raises(ImageError):
        load_manifest(tmp_path)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "UPPER", "x" * 64])
def test_image_names_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        image_dir(tmp_path, name)


def test_mmdebstrap_command() -> None:
    argv = mmdebstrap_command(
        Path("/d/images/.tmp-x/rootfs"), "http://m.example/debian", load_recipe("default")
    )
    assert argv[0] == "mmdebstrap"
    assert "--variant=apt" in argv
    assert "--mode=root" in argv
    assert "--include=python3,nodejs,bash,coreutils" in argv
    assert argv[-3:] == ["bookworm", "/d/images/.tmp-x/rootfs", "http://m.example/debian"]
    hooks = " ".join(a for a in argv if a.startswith("--customize-hook="))
    assert "-perm /6000" in hooks
    assert "chown 1000:1000" in hooks
    assert "/.sandstorm" in hooks
    assert "var/lib/apt/lists" in hooks
