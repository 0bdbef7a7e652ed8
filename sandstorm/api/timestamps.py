"""RFC 3339 UTC timestamps, the only time format on the wire."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339_from_epoch(seconds: float) -> str:
    return rfc3339(datetime.fromtimestamp(seconds, UTC))
