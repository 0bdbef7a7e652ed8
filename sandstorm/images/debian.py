"""Reading Debian's own files: the apt sources (which mirror an image is built from) and the
dpkg status database (which versions an image holds). Pure text parsing, no I/O but the one
``find_apt_mirror`` read."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

__all__ = [
    "DEBIAN_SUITE",
    "DEFAULT_MIRROR",
    "find_apt_mirror",
    "parse_deb822_sources",
    "parse_one_line_sources",
]

DEBIAN_SUITE: Final = "bookworm"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"


def _deb822_paragraphs(text: str) -> Iterable[dict[str, str]]:
    """Paragraphs of a deb822 file as {lower-case field: value}; continuation lines are joined."""
    fields: dict[str, str] = {}
    current: str | None = None
    for raw in [*text.splitlines(), ""]:
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, current = {}, None
            continue
        if line[0] in " \t":
            if current is not None:
                # " ." is deb822's way to write an empty line inside a multi-line value.
                piece = line.strip()
                fields[current] += "\n" + ("" if piece == "." else piece)
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue  # not a field; apt would reject it, we just skip it
        current = key.strip().lower()
        fields[current] = value.strip()


def parse_deb822_sources(text: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """Mirror URIs of the enabled ``deb`` entries for *suite* (exactly, not ``suite-updates``)
    with the ``main`` component, from an apt ``.sources`` (deb822) file, in file order."""
    uris: list[str] = []
    for para in _deb822_paragraphs(text):
        if para.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in para.get("types", "").split():
            continue
        if suite not in para.get("suites", "").split():
            continue
        if "main" not in para.get("components", "").split():
            continue
        for uri in para.get("uris", "").split():
            if _usable_mirror(uri) and uri not in uris:
                uris.append(uri)
    return uris


def parse_one_line_sources(text: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """Mirror URIs of the ``deb`` lines for *suite* with the ``main`` component, from an apt
    ``sources.list`` in the one-line format (``deb [opts] URI SUITE COMPONENT...``)."""
    uris: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Options may contain spaces inside the brackets: "[arch=amd64 signed-by=...]".
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) < 4 or words[0] != "deb":
            continue
        uri, line_suite, components = words[1], words[2], words[3:]
        if line_suite != suite or "main" not in components:
            continue
        if _usable_mirror(uri) and uri not in uris:
            uris.append(uri)
    return uris


def _usable_mirror(uri: str) -> bool:
    # mmdebstrap fetches with apt, which handles these; a cdrom: entry is useless for us.
    return uri.split(":", 1)[0] in {"http", "https", "file", "mirror+http", "mirror+https"}


def find_apt_mirror(suite: str = DEBIAN_SUITE, *, apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses for *suite*.

    Looks at ``sources.list.d/debian.sources`` (deb822, Debian 12's default) and then
    ``sources.list`` (one-line format). Other files under ``sources.list.d`` are third-party
    repositories (Docker, NodeSource, ...) and are not Debian mirrors, so they are ignored.
    Falls back to :data:`DEFAULT_MIRROR` (e.g. on Ubuntu, whose sources have no ``bookworm``).
    """
    candidates: list[tuple[Path, Callable[[str, str], list[str]]]] = [
        (apt_dir / "sources.list.d" / "debian.sources", parse_deb822_sources),
        (apt_dir / "sources.list", parse_one_line_sources),
    ]
    for path, parse in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        uris = parse(text, suite)
        if uris:
            return uris[0]
    return DEFAULT_MIRROR
