"""Throwaway SoftHSM2 tokens, for tests that talk PKCS#11 (python-pkcs11) to a real token.

SoftHSM2 is a library, not a server: the "HSM" is the ``libsofthsm2.so`` module
loaded into the test process plus a token folder on disk. :class:`SoftHSM`
writes its own ``softhsm2.conf`` (``directories.tokendir`` in a temporary
folder), points ``SOFTHSM2_CONF`` at it and initialises tokens with
``softhsm2-util --init-token --free``; the machine's tokens are never touched.

SoftHSM2 reads its configuration and scans the token folder **once per process**,
when the module is first initialised (``C_Initialize``). Hence:

* every token a test run needs is created up front: the session fixture
  ``softhsm`` initialises one token per label in :data:`SESSION_TOKENS`
  (random PINs, see :meth:`SoftHSM.token`);
* a token created later is invisible to a process that already loaded the
  library, and so is a second ``SoftHSM`` with another folder.

To get the fixture, list this module as a plugin from a plugin module or the root
conftest: ``pytest_plugins = ["tests.servers.softhsm"]``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Where distributions install the module (Debian first); ``SOFTHSM2_LIBRARY`` overrides.
LIBRARY_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
#: Token labels the session fixture creates (at most 32 characters each).
MAIN_TOKEN = "keyvault-main"  # the contract suite's token
LOGIN_TOKEN = "keyvault-login"  # nobody logs in before the wrong-PIN test
RECOVERY_TOKEN = "keyvault-recovery"  # tests that break the login on purpose
SESSION_TOKENS = (MAIN_TOKEN, LOGIN_TOKEN, RECOVERY_TOKEN)
INIT_TIMEOUT = 30.0


def find_library() -> str:
    """Return the resolved path of ``libsofthsm2.so``; fail with an install hint if there is none.

    The path is resolved (Debian's ``/usr/lib/softhsm`` entry is a symlink) because
    python-pkcs11 caches modules by path string: loading the same file under a
    second name fails with "already initialized".
    """
    override = os.environ.get("SOFTHSM2_LIBRARY")
    candidates = (override,) if override else LIBRARY_CANDIDATES
    for path in candidates:
        if path and os.path.isfile(path):
            return os.path.realpath(path)
    raise RuntimeError(
        f"SoftHSM2 is not installed (looked for {', '.join(candidates)}): apt-get install softhsm2, "
        "or set SOFTHSM2_LIBRARY"
    )


def find_util() -> str:
    """Return the path of ``softhsm2-util``."""
    path = shutil.which("softhsm2-util")
    if path is None:
        raise RuntimeError("softhsm2-util is not on PATH: apt-get install softhsm2")
    return path


@dataclass(frozen=True)
class SoftHSMToken:
    """One initialised token: its label and PINs (test secrets, random per run)."""

    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)


class SoftHSM:
    """SoftHSM2 tokens in a folder of their own, configured through ``SOFTHSM2_CONF``.

    :param root: an empty folder; the config file and the token folder go in it.
    :param labels: the tokens to initialise on :meth:`start`.
    """

    def __init__(self, root: Path, labels: Iterable[str] = SESSION_TOKENS) -> None:
        self.root = Path(root)
        self.labels = tuple(labels)
        self.config = self.root / "softhsm2.conf"
        self.token_dir = self.root / "tokens"
        self.library = find_library()
        self._tokens: dict[str, SoftHSMToken] = {}
        self._previous_conf: str | None = None
        self._started = False

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see these tokens."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.config)}

    def start(self) -> SoftHSM:
        """Write the config, initialise every token and point this process at them."""
        self.token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(
            f"directories.tokendir = {self.token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "slots.mechanisms = ALL\n"
        )
        util = find_util()
        for label in self.labels:
            token = SoftHSMToken(label=label, pin=secrets.token_hex(8), so_pin=secrets.token_hex(8))
            result = subprocess.run(
                [util, "--init-token", "--free", "--label", label, "--pin", token.pin, "--so-pin", token.so_pin],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=INIT_TIMEOUT,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"softhsm2-util could not initialise token {label!r}: {result.stderr.strip()}")
            self._tokens[label] = token
        self._previous_conf = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.config)
        self._started = True
        return self

    def stop(self) -> None:
        """Restore ``SOFTHSM2_CONF``; the folder is left to its owner (``tmp_path_factory``)."""
        if not self._started:
            return
        if self._previous_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = self._previous_conf
        self._started = False

    def token(self, label: str = MAIN_TOKEN) -> SoftHSMToken:
        """Return the token labelled ``label`` (``KeyError`` if it was not created)."""
        return self._tokens[label]

    def __enter__(self) -> SoftHSM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory) -> Iterator[SoftHSM]:
    """SoftHSM2 with the tokens of :data:`SESSION_TOKENS`, for the whole test session."""
    with SoftHSM(tmp_path_factory.mktemp("softhsm")) as hsm:
        yield hsm
