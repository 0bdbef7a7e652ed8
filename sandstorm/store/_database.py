"""The connection every part of :class:`~sandstorm.store.Store` shares, and its transactions."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

from sandstorm.store.schema import DB_NAME, StoreError, migrate

T = TypeVar("T")


class Database:
    """One connection to ``sandstorm.db``; not thread-safe by itself (see AsyncStore)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    def open(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created private before SQLite opens it: its -wal and -shm files take the database
        # file's permissions, so nothing of it is ever readable by other users.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE), so a
        # read always sees what the CLI committed last. The gateway hands the connection to one
        # worker thread at a time (AsyncStore), hence check_same_thread=False.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            migrate(db, self.path)
        except BaseException:
            db.close()
            raise
        self._db = db
        self.path.chmod(0o600)
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tx(self, work: Callable[[sqlite3.Connection], T], *, full: bool = False) -> T:
        """Run ``work`` in one write transaction; ``full`` makes the commit durable at once
        (synchronous=FULL) for records that must survive a power cut (keys, snapshots)."""
        db = self.db
        if full:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                value = work(db)
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): the error
                # to report is the one that ended the transaction, not ROLLBACK's own.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return value
        finally:
            if full:
                db.execute("PRAGMA synchronous=NORMAL")
