"""Public identifiers: a prefix plus 26 Crockford base32 characters of 128 random bits."""

from __future__ import annotations

import re
import secrets

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RE = re.compile(r"^(sbx|exe|snp)_[0-9A-HJKMNP-TV-Z]{26}$")


def new_id(prefix: str) -> str:
    value = secrets.randbits(128)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` is well formed for ``prefix``; cheap, used before touching any path."""
    match = _ID_RE.match(value)
    return match is not None and match.group(1) == prefix
