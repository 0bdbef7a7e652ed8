"""Fixtures of the API tests against a real gateway."""

from __future__ import annotations

import pytest

from tests.harness import RunningGateway, never_500


@pytest.fixture
def g(gw: RunningGateway) -> RunningGateway:
    """``gw`` on which any 500 fails the test."""
    never_500(gw)
    return gw
