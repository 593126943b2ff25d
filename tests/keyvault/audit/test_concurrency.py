"""Concurrent writers (threads and separate processes) never fork the chain."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connection, connections

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.models import AuditEvent

ROOT = Path(__file__).resolve().parents[3]


def _write(n, name):
    try:
        for i in range(n):
            audit.record(Action.OTHER, actor=Actor.system(name), details={"i": i})
    finally:
        connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_threads_append_without_forking_the_chain():
    threads = [threading.Thread(target=_write, args=(15, f"thread-{t}")) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(AuditEvent.objects.values_list("sequence", flat=True)) == list(range(1, 91))
    assert audit.verify_chain().ok


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_processes_append_without_forking_the_chain():
    assert connection.vendor == "postgresql"
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    script = (
        "import django; django.setup()\n"
        "from keyvault import audit\n"
        "from keyvault.audit import Action, Actor\n"
        "import sys\n"
        "for i in range(25):\n"
        "    audit.record(Action.OTHER, actor=Actor.system(sys.argv[1]), details={'i': i})\n"
    )
    env = {**os.environ, "HMD_DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "keyvault.settings"}
    workers = [
        subprocess.Popen([sys.executable, "-c", script, f"proc-{n}"], cwd=ROOT, env=env) for n in range(4)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]

    assert sorted(AuditEvent.objects.values_list("sequence", flat=True)) == list(range(1, 101))
    result = audit.verify_chain()
    assert result.ok, str(result)
