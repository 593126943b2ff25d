"""The schemathesis CLI against a live Keyvault: gunicorn on a free port, a real client token, no 500s.

``test_schema.py`` drives schemathesis' strategies in process; this runs the command CI would
run, over HTTP, against the schema the server publishes, with the same checks. The server has a
scratch database of its own (migrated, with a KEK, a client and a data key made through the
services), so the generated requests reach the endpoints behind the token, not only the 401.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.keyvault.api.test_schema import CHECKS
from tests.servers.keyvault_web import serve

pytestmark = pytest.mark.slow

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
#: Per operation and phase: the 8 operations take about 30 s here (a shared 2-core machine).
MAX_EXAMPLES = 25
#: Not ``coverage``: its boundary cases include 1,000-item batches, each of which takes seconds on the
#: scratch server (huge batches have their own tests); ``examples`` runs whatever examples the schema has.
PHASES = "examples,fuzzing,stateful"
SETUP = """
from keyvault.api import services
from keyvault.audit import Actor
from keyvault.keys import services as key_services

actor = Actor.system("schemathesis")
kek = key_services.create_kek(name="billing-kek", actor=actor)
client, token = services.create_client(
    name="billing", actor=actor, keks=[kek.name], operations=list(services.OPERATIONS),
    context_constraints={"service": ["billing"]}, rate_limit_per_second=0)
row, plaintext = services.generate_data_key(client, kek.name, actor=actor, context={"service": "billing"})
print(row.pk, token)
"""
#: Unwrap by the id of the data key SETUP made, so its generated bodies reach the unwrap itself, not only a 404.
CONFIG = """
[[operations]]
include-name = "POST /api/v1/data-keys/{data_key_id}/unwrap"
parameters = { "path.data_key_id" = %d }
"""


def schemathesis_run(base_url: str, setup_output: str, tmp_path: Path) -> subprocess.CompletedProcess:
    data_key_id, token = setup_output.split()
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG % int(data_key_id))
    command = [
        str(SCHEMATHESIS), "--config-file", str(config), "run", f"{base_url}/api/v1/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", ",".join(check.__name__ for check in CHECKS),
        "--max-examples", str(MAX_EXAMPLES), "--phases", PHASES, "--seed", "17",
        # one worker: Hypothesis' lambda descriptions call ast.parse, which is not thread-safe on Python 3.11
        "--workers", "1",
        "--generation-database", "none", "--request-timeout", "20", "--no-color",
    ]
    # in tmp_path: the CLI keeps a crash cache (.schemathesis/) in its working directory
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_schemathesis_cli_finds_no_server_error_and_no_schema_violation_on_a_live_server(tmp_path):
    with serve(tmp_path, setup=SETUP) as live:
        done = schemathesis_run(live.base_url, live.setup_output, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-20000:]
    assert "Selected: 8/8" in output and "Tested: 8" in output and " passed" in output, output[-5000:]
