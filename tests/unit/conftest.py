"""Fixtures the unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandstorm.config import Config, load_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A configuration whose data directory exists and whose mount allow-list is one directory,
    ``tmp_path/allowed``, holding ``file.txt``."""
    data = tmp_path / "data"
    data.mkdir()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "file.txt").write_text("hello\n")
    return load_config(None, data_dir=str(data), mount_allow_list=[str(allowed)])
