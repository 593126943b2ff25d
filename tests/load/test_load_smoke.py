"""Five-second smoke run of bench/loadtest.py: gunicorn + 2FA logins + browsing during rotations, 0 errors.

The 60-second, 50-user run is ``make loadtest`` (PostgreSQL); this one keeps the
script working in the suite on a scratch SQLite database of its own.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_five_second_load_smoke_has_no_errors():
    # given the load script with a few users for five seconds on its own scratch database
    command = [sys.executable, "bench/loadtest.py", "--users", "5", "--duration", "5",
               "--data-keys", "200", "--web-workers", "2"]

    # when it runs against a real gunicorn
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={k: v for k, v in __import__("os").environ.items()
                               if not k.startswith("HMD_") and k not in ("DJANGO_SETTINGS_MODULE",
                                                                        "DJANGO_ALLOW_ASYNC_UNSAFE")})

    # then it served requests with 0 errors while at least one rotation completed
    summary = done.stdout
    assert done.returncode == 0, summary + done.stderr[-3000:]
    assert "errors=0" in summary and "requests=0 " not in summary
    assert "latency p50=" in summary and "completed" in summary
