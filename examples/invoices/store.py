"""Invoices in the application's own SQLite file, each row AES-256-GCM under a Keyvault data key.

A row holds the data key's id and ``nonce || ciphertext``, nothing else: no wrapped key,
no KEK version. Writing uses one data key for ``rows_per_key`` rows, then asks Keyvault for
a new one; reading unwraps the row's data key by id, so whatever Keyvault did to the key's
wrapping meanwhile (a KEK rotation) is invisible here. The row id is the AES-GCM associated
data, so a ciphertext moved to another row does not open.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault_client import KeyvaultClient

NONCE_BYTES = 12
SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    id INTEGER PRIMARY KEY,
    data_key_id INTEGER NOT NULL,
    ciphertext BLOB NOT NULL
)
"""


class InvoiceStore:
    """Encrypted invoices in ``path``; data keys from ``client`` under ``kek`` in ``context``."""

    def __init__(self, path: Path | str, client: KeyvaultClient, *, kek: str, context: Mapping[str, str],
                 rows_per_key: int = 100) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute(SCHEMA)
        self.client, self.kek, self.context, self.rows_per_key = client, kek, dict(context), rows_per_key
        self._writing_key: tuple[int, AESGCM] | None = None
        self._rows_on_key = 0

    def close(self) -> None:
        self.db.close()

    def _key_for_writing(self) -> tuple[int, AESGCM]:
        if self._writing_key is None or self._rows_on_key >= self.rows_per_key:
            data_key = self.client.generate_data_key(self.kek, self.context, purpose="invoice rows")
            self._writing_key, self._rows_on_key = (data_key.id, AESGCM(data_key.plaintext)), 0
        self._rows_on_key += 1
        return self._writing_key

    def add(self, text: str) -> int:
        """Store one invoice; its row id."""
        data_key_id, aead = self._key_for_writing()
        row_id = self.db.execute("SELECT coalesce(max(id), 0) + 1 FROM invoices").fetchone()[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + aead.encrypt(nonce, text.encode(), str(row_id).encode())
        self.db.execute("INSERT INTO invoices (id, data_key_id, ciphertext) VALUES (?, ?, ?)",
                        (row_id, data_key_id, sealed))
        return row_id

    def get(self, row_id: int) -> str:
        """One invoice, opened with its data key unwrapped by id."""
        data_key_id, sealed = self.db.execute(
            "SELECT data_key_id, ciphertext FROM invoices WHERE id = ?", (row_id,)).fetchone()
        aead = AESGCM(self.client.unwrap(data_key_id, self.context))
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], str(row_id).encode()).decode()

    def all(self) -> dict[int, str]:
        """Every invoice by row id."""
        return {row_id: self.get(row_id) for (row_id,) in self.db.execute("SELECT id FROM invoices ORDER BY id")}

    def data_key_ids(self) -> set[int]:
        return {key_id for (key_id,) in self.db.execute("SELECT DISTINCT data_key_id FROM invoices")}
