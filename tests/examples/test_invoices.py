"""examples/invoices keeps working, unchanged, across a KEK rotation run while it writes and reads.

A real gunicorn serves the API, a real Celery worker runs the rotation that
``manage.py rotation start --kek invoices-kek --wait`` starts, and the example app writes
and reads rows in a loop the whole time.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading

import pytest

from examples.invoices.store import InvoiceStore
from keyvault_client import KeyvaultClient
from tests.scratch import ROOT
from tests.servers.keyvault import running_keyvault

pytestmark = pytest.mark.slow
CONTEXT = {"app": "invoices"}


class WritingAndReading(threading.Thread):
    """The example app at work: add a row, read back a random earlier one, until stopped."""

    def __init__(self, open_store):
        super().__init__(daemon=True)
        self.open_store, self.written, self.errors = open_store, {}, []
        self.stop = threading.Event()
        self.reads = 0
        self.versions_seen = []  # the KEK version wrapping the data key of each row read, in order

    def run(self):
        self.store = self.open_store()  # sqlite3 connections stay in the thread that made them
        while not self.stop.is_set():
            try:
                text = f"invoice {len(self.written)}: {random.randrange(10**9)} EUR"
                self.written[self.store.add(text)] = text
                row_id = random.choice(list(self.written))
                assert self.store.get(row_id) == self.written[row_id], f"row {row_id} changed"
                self.reads += 1
                [key_id] = self.store.db.execute("SELECT data_key_id FROM invoices WHERE id = ?", (row_id,)).fetchone()
                self.versions_seen.append(self.store.client.describe(key_id)["kek_version"])
            except Exception as exc:  # noqa: BLE001 - kept to fail the test with
                self.errors.append(repr(exc))
                return


def _rows_written(loop: WritingAndReading, at_least: int) -> None:
    for _ in range(600):
        if len(loop.written) >= at_least or loop.errors:
            return
        loop.stop.wait(0.1)


def test_the_invoices_example_survives_a_kek_rotation_run_while_working(tmp_path):
    # one data key per rewrap batch and a few provider calls a second, so the rewrap takes seconds and the
    # app reads in the middle of it
    with running_keyvault(tmp_path / "instance", worker=True, HMD_ROTATION_BATCH_SIZE="1",
                          HMD_ROTATION_RATE_LIMITS="local=4") as live:
        live.manage("kms", "create-key", "invoices-kek")
        token = live.create_client("invoices", "invoices-kek", ops="generate,unwrap,describe",
                                   context_require=("app=invoices",), rate_limit=0)
        client = KeyvaultClient(live.url, token)
        loop = WritingAndReading(lambda: InvoiceStore(tmp_path / "invoices.sqlite3", client, kek="invoices-kek",
                                                      context=CONTEXT, rows_per_key=5))
        loop.start()
        _rows_written(loop, 30)
        # when a rotation of the KEK runs to the end while the app keeps writing and reading
        before = len(loop.written)
        rotation = live.scratch.run("rotation", "start", "--kek", "invoices-kek", "--wait", timeout=300)
        during = len(loop.written) - before
        _rows_written(loop, len(loop.written) + 10)
        loop.stop.set()
        loop.join(timeout=60)
        assert loop.errors == [], loop.errors
        assert before >= 30 and during > 0 and len(loop.written) >= before + during + 10, (before, during)
        # the app read in the middle of the rewrap: a key still at v1 after another was already at v2
        first_v2 = loop.versions_seen.index(2)
        assert 1 in loop.versions_seen[first_v2:], "no read while the rewrap was under way"
        assert "started (KEK invoices-kek" in rotation.stdout.decode()

        # then every row opens, by a fresh process of the app, to what was written
        reader = InvoiceStore(tmp_path / "invoices.sqlite3", KeyvaultClient(live.url, token), kek="invoices-kek",
                              context=CONTEXT)
        assert reader.all() == loop.written
        env = {**os.environ, "KEYVAULT_URL": live.url, "KEYVAULT_TOKEN": token,
               "INVOICES_DB": str(tmp_path / "invoices.sqlite3")}
        listed = subprocess.run([sys.executable, "-m", "examples.invoices", "list"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == len(loop.written)

        # and every data key the app used is now wrapped by the new primary version, v2
        key_ids = reader.data_key_ids()
        assert {client.describe(key_id)["kek_version"] for key_id in key_ids} == {2}
        described = live.manage("kms", "describe-key", "invoices-kek")
        assert re.search(rf"v2: enabled \(primary\), {len(key_ids)} data key\(s\)", described), described
        assert re.search(r"v1: [^\n]*\b0 data key\(s\)", described), described
        assert "audit chain intact" in live.manage("audit", "verify")
