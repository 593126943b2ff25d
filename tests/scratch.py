"""A scratch Keyvault instance in a temporary folder, driven through ``manage.py`` as operators do."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Scratch:
    """SQLite + local provider under ``data_dir``; ``run`` executes ``manage.py`` there."""

    data_dir: Path
    extra_env: dict

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
        env.update({"HMD_DATA_DIR": str(self.data_dir), "HMD_DEBUG": "true", **self.extra_env})
        env.pop("DJANGO_SETTINGS_MODULE", None)
        return env

    def run(self, *args: str, input: bytes | str | None = None, check: bool = True, timeout: float = 60):
        if isinstance(input, str):
            input = input.encode()
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            input=input,
            capture_output=True,
            cwd=ROOT,
            env=self.env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"manage.py {' '.join(args)} exited {result.returncode}\nstdout: {result.stdout.decode(errors='replace')}"
                f"\nstderr: {result.stderr.decode(errors='replace')}"
            )
        return result

    def shell(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        """Run a shell command line (as written in the docs) with this instance's environment."""
        env = {**self.env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", *args], input=input, capture_output=True, text=True,
            cwd=ROOT, env=env, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args[0]!r} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result


def make_scratch(data_dir: Path, **extra_env: str) -> Scratch:
    scratch = Scratch(data_dir=data_dir, extra_env=extra_env)
    scratch.run("migrate", "-v0")
    return scratch
