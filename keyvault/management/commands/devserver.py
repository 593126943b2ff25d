"""``manage.py devserver`` — what ``make run`` runs: migrate, bootstrap, then web + worker + beat.

Everything runs on the embedded defaults (SQLite, Celery's filesystem broker, the
local KMS provider) unless ``HMD_*`` variables say otherwise. Ctrl-C stops all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from keyvault.config import env
from keyvault.ops.bootstrap import DEMO_DATA_KEYS, bootstrap


class Command(BaseCommand):
    help = "Migrate, create an admin and a default KEK if missing, and run the console, a worker and beat."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default=env.str("HMD_RUN_ADDR", default="127.0.0.1:8000"))
        parser.add_argument("--no-worker", action="store_true", help="Run only the web console.")
        parser.add_argument("--no-demo", action="store_true",
                            help="Register no demo data keys under the KEK a fresh installation gets.")

    def handle(self, *args, addr, no_worker, no_demo, **options):
        call_command("migrate", interactive=False, verbosity=0)
        if not settings.DEBUG:
            # Without DEBUG, runserver serves no static files: WhiteNoise serves the collected ones.
            call_command("collectstatic", interactive=False, verbosity=0)
        result = bootstrap(admin_password=env.str("HMD_ADMIN_PASSWORD", default="") or None,
                           demo_data_keys=0 if no_demo else DEMO_DATA_KEYS)
        if result.admin_created:
            if result.generated_password:
                self.stdout.write(self.style.WARNING(
                    f"Created administrator {result.admin_username!r} with password: {result.generated_password}\n"
                    "This is shown once; change it after logging in."
                ))
            else:
                self.stdout.write(f"Created administrator {result.admin_username!r} (password from HMD_ADMIN_PASSWORD).")
        if result.kek_created:
            demo = (f", with {result.demo_data_keys} registered demo data keys for a first rotation to rewrap"
                    if result.demo_data_keys else "")
            self.stdout.write(f"Created the local KEK 'default'{demo}.")
        processes = self._start(addr, no_worker)
        self.stdout.write(self.style.SUCCESS(f"Keyvault console: http://{addr}/  (Ctrl-C stops web, worker and beat)"))
        self._supervise(processes)

    def _start(self, addr: str, no_worker: bool) -> dict[str, subprocess.Popen]:
        python = sys.executable
        manage = os.path.join(settings.BASE_DIR, "manage.py")
        commands = {"web": [python, manage, "runserver", addr, "--noreload"]}
        if not no_worker:
            commands["worker"] = [python, "-m", "celery", "-A", "keyvault", "worker", "--loglevel", "INFO",
                                  "--concurrency", "2", "--hostname", "worker@%h"]
            commands["beat"] = [python, "-m", "celery", "-A", "keyvault", "beat", "--loglevel", "INFO",
                                "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME]
        # Each child in its own process group, so Ctrl-C reaches us and we stop them in order.
        return {name: subprocess.Popen(cmd, cwd=settings.BASE_DIR, start_new_session=True) for name, cmd in commands.items()}

    def _supervise(self, processes: dict[str, subprocess.Popen]) -> None:
        stop = False

        def request_stop(signum, frame):
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        try:
            while not stop:
                for name, process in processes.items():
                    if process.poll() is not None:
                        self.stderr.write(f"{name} exited with code {process.returncode}; stopping the others")
                        stop = True
                time.sleep(0.5)
        finally:
            self._stop(processes)

    def _stop(self, processes: dict[str, subprocess.Popen]) -> None:
        for process in processes.values():
            if process.poll() is None:
                # The main process only: Celery's warm shutdown then stops its own pool.
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, process in processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in time; killing it")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.stdout.write("stopped web, worker and beat")
