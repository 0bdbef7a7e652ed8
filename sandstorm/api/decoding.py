"""Decoding request bodies and stream frames: every way one can be wrong becomes a 400 that
names the field, and none of it blocks the event loop for long."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TypeVar

import msgspec
import trio

from sandstorm.errors import InvalidRequest, invalid_from_msgspec

T = TypeVar("T")


async def decode_request(decoder: msgspec.json.Decoder[T], raw: bytes | str) -> T:
    """:func:`decode_json`, in a worker thread for large inputs (up to 16 MiB), whose decoding
    would hold the event loop too long."""
    if len(raw) > INLINE_DECODE_BYTES:
        return await trio.to_thread.run_sync(decode_json, decoder, raw)
    return decode_json(decoder, raw)


# A high surrogate escape not followed by a low one, or a low one without a high one before it.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)

# Bodies above this are decoded in a worker thread rather than on the event loop.
INLINE_DECODE_BYTES = 64 * 1024


def decode_json(decoder: msgspec.json.Decoder[T], raw: bytes | str) -> T:
    """Decode a request body; every way it can be wrong becomes a 400 naming the field.

    Blocking, for a time that grows with the body; callers with a large body run it in a
    worker thread.
    """
    try:
        value = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        if _LONE_SURROGATE.search(raw if isinstance(raw, bytes) else raw.encode()) is not None:
            # msgspec says "Input data was truncated" or "unexpected end of ... surrogate pair".
            raise InvalidRequest(
                f"JSON string holds a lone UTF-16 surrogate escape ({exc})", field="body"
            ) from None
        raise invalid_from_msgspec(exc) from None
    except msgspec.ValidationError as exc:
        raise invalid_from_msgspec(exc) from None
    except UnicodeDecodeError as exc:
        # msgspec reports bytes that are not UTF-8 this way (raw surrogates among them); the
        # field cannot be known.
        raise InvalidRequest(f"body is not valid UTF-8: {exc.reason}", field="body") from None
    except RecursionError:
        raise InvalidRequest("JSON is nested too deeply", field="body") from None
    # Only a body msgspec accepted is scanned again: its nesting is then bounded by the typed
    # schema (a few levels), it is valid UTF-8 and holds no NaN, Infinity or lone surrogate.
    duplicate = find_duplicate_key(raw)
    if duplicate is not None:
        raise InvalidRequest(f"JSON object repeats the key `{duplicate}`", field=duplicate)
    return value


class _Duplicate:
    """Stands in, during the scan, for an object that repeats ``key``."""

    __slots__ = ("key", "pairs")

    def __init__(self, key: str, pairs: list[tuple[str, object]]) -> None:
        self.key = key
        self.pairs = pairs


def _ignore(_: str) -> None:
    return None


def find_duplicate_key(raw: bytes | str) -> str | None:
    """The path of the first key repeated in one JSON object (``environment.A``), or None.

    msgspec keeps the last of duplicated keys silently; a request that says two things about one
    field is refused instead. Meant for text msgspec has accepted (valid JSON, bounded depth).
    First a cheap test (msgspec and ``bytes.count``, no Python per byte): keys in the text minus
    distinct keys in the decoded tree. Only when that finds a duplicate is the text scanned again
    with the standard library's parser and an ``object_pairs_hook``, to name the key's path.
    """
    if not _has_duplicate_keys(raw):
        return None
    text = raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw
    found = False

    def hook(pairs: list[tuple[str, object]]) -> object:
        nonlocal found
        if len(pairs) > 1:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    found = True
                    return _Duplicate(key, pairs)
                seen.add(key)
        return dict(pairs)

    try:
        tree = json.loads(
            text,
            object_pairs_hook=hook,
            parse_int=_ignore,
            parse_float=_ignore,
            parse_constant=_ignore,
        )
    except (ValueError, RecursionError):
        return None
    if not found:
        return None
    try:
        return _duplicate_path(tree, "")
    except RecursionError:
        return "body"


def _has_duplicate_keys(raw: bytes | str) -> bool:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # Strings in the text: quotes not escaped, in pairs. Outside strings valid JSON has no
    # backslash; inside, escapes read left to right, so once every "\\\\" is dropped the
    # "\\"" left are exactly the escaped quotes. (bytes.count runs in C, no Python per byte.)
    quotes = data.count(b'"')
    if quotes < 4:
        return False  # fewer than two keys: nothing to repeat
    if b"\\" in data:  # memchr: free when there is no backslash at all
        if b"\\\\" in data:
            data = data.replace(b"\\\\", b"")
        quotes -= data.count(b'\\"')
    try:
        tree = msgspec.json.decode(data if data is raw else raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return True  # let the full scan decide (it gives None for what is not JSON)
    try:
        distinct, values = _count_keys_and_strings(tree)
    except RecursionError:
        return True
    return quotes // 2 - values != distinct


def _count_keys_and_strings(node: object) -> tuple[int, int]:
    """(keys, string values) in a decoded JSON tree."""
    children: Iterable[object]
    if isinstance(node, dict):
        keys, values = len(node), 0
        children = node.values()
    elif isinstance(node, list):
        keys, values = 0, 0
        children = node
    else:
        return 0, 1 if isinstance(node, str) else 0
    for child in children:
        if isinstance(child, str):
            values += 1
        elif isinstance(child, (dict, list)):
            k, v = _count_keys_and_strings(child)
            keys += k
            values += v
    return keys, values


def _duplicate_path(node: object, path: str) -> str | None:
    if isinstance(node, _Duplicate):
        return f"{path}.{node.key}" if path else node.key
    children: list[tuple[str, object]]
    if isinstance(node, dict):
        children = [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(node)]
    else:
        return None
    for child_path, child in children:
        found = _duplicate_path(child, child_path)
        if found is not None:
            return found
    return None
