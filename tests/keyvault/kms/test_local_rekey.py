"""Re-keying the local keyring (``LocalKMSProvider.rekey``): atomic, lossless, and safe beside old processes.

Given a keyring with keys, versions and ciphertexts, when it is re-keyed, then everything
encrypted before still decrypts, the old master key no longer opens the file, and the file
stays 0600. When the re-keying fails or the process dies at any step, the keyring is fully
usable under exactly one of the two keys and nothing is lost. Processes that still hold the
old key refuse the keyring and never write it.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keyvault.kms import ConfigurationError, StorageUnavailable
from keyvault.kms.local import (
    LocalKMSProvider,
    decode_master_key,
    generate_master_key,
    read_master_key_file,
    write_master_key_file,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def old_key():
    return generate_master_key()


@pytest.fixture
def new_key():
    return decode_master_key(generate_master_key())


@pytest.fixture
def keyring(tmp_path, old_key):
    """A keyring with two keys, one rotated (two versions) and one version disabled, plus ciphertexts."""
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    provider = LocalKMSProvider(folder / "local-kms.keyring", old_key)
    provider.create_key("payments")
    provider.create_key("ledger")
    sealed = [provider.encrypt("payments", b"v1 secret", encryption_context={"t": "a"})]
    provider.rotate_key("payments")
    sealed.append(provider.encrypt("payments", b"v2 secret", encryption_context={"t": "a"}))
    data_key = provider.generate_data_key("ledger")
    return provider, sealed, data_key


def _all_open(provider: LocalKMSProvider, sealed, data_key) -> None:
    assert provider.decrypt(sealed[0].ciphertext, encryption_context={"t": "a"}).plaintext == b"v1 secret"
    assert provider.decrypt(sealed[1].ciphertext, encryption_context={"t": "a"}).plaintext == b"v2 secret"
    assert provider.decrypt(data_key.ciphertext).plaintext == bytes(data_key.plaintext)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".probe")))


def test_rekey_keeps_every_ciphertext_and_shuts_out_the_old_key(keyring, old_key, new_key):
    provider, sealed, data_key = keyring
    before = provider.describe_key("payments")
    # when
    result = provider.rekey(new_key)
    # then the same provider and a fresh one on the new key open everything made before
    assert (result.keys, result.already) == (2, False)
    _all_open(provider, sealed, data_key)
    fresh = LocalKMSProvider(provider.path, new_key)
    _all_open(fresh, sealed, data_key)
    after = fresh.describe_key("payments")
    assert after.primary_version == before.primary_version == 2
    assert [v.encrypt_count for v in after.versions] == [v.encrypt_count for v in before.versions]
    # and the old key no longer opens the keyring
    with pytest.raises(ConfigurationError, match="cannot be opened with this master key"):
        LocalKMSProvider(provider.path, old_key).describe_key("payments")
    # and the file is 0600, in its 0700 folder, with no temp file left
    assert provider.path.stat().st_mode & 0o777 == 0o600
    assert provider.path.parent.stat().st_mode & 0o777 == 0o700
    assert _leftovers(provider.path.parent) == []
    # and new work goes on under the new key
    again = provider.encrypt("ledger", b"after")
    assert fresh.decrypt(again.ciphertext).plaintext == b"after"


def test_rekey_refuses_the_same_key_a_bad_key_and_a_missing_keyring(keyring, old_key, tmp_path):
    provider, _, _ = keyring
    blob = provider.path.read_bytes()
    with pytest.raises(ConfigurationError, match="already"):
        provider.rekey(old_key)
    with pytest.raises(ConfigurationError, match="32 random bytes"):
        provider.rekey("not base64!")
    with pytest.raises(ConfigurationError, match="no local keyring"):
        LocalKMSProvider(tmp_path / "none" / "keyring", old_key).rekey(generate_master_key())
    # a third key opens nothing: the keyring is refused and left alone
    stranger = LocalKMSProvider(provider.path, generate_master_key())
    with pytest.raises(ConfigurationError, match="cannot be opened"):
        stranger.rekey(generate_master_key())
    assert provider.path.read_bytes() == blob


def test_rekey_again_after_the_swap_completes_without_writing(keyring, old_key, new_key):
    # given a keyring re-keyed by another process, and this one still configured with the old key
    provider, sealed, data_key = keyring
    LocalKMSProvider(provider.path, old_key).rekey(new_key)
    blob = provider.path.read_bytes()
    # when the re-keying is run again with the same new key
    result = provider.rekey(new_key)
    # then it is recognised as done, nothing is rewritten, and this provider now uses the new key
    assert result.already is True
    assert provider.path.read_bytes() == blob
    _all_open(provider, sealed, data_key)


STEPS = ("write", "fsync", "check", "rename", "fsync-folder")


def _fail_at(monkeypatch, step: str, failure: BaseException) -> None:
    """Make ``rekey`` fail at ``step`` of writing the new keyring (the real calls, not stubs, otherwise)."""
    import keyvault.kms.local as local

    def raising(*_args, **_kwargs):
        raise failure

    real_fsync, real_fdopen = os.fsync, os.fdopen
    calls = {"fsync": 0}

    if step == "write":

        class Refusing:
            def __init__(self, fd, mode):
                self.handle = real_fdopen(fd, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                raise failure

        monkeypatch.setattr(local.os, "fdopen", Refusing)
    elif step == "fsync":
        monkeypatch.setattr(local.os, "fsync", raising)
    elif step == "rename":
        monkeypatch.setattr(local.os, "replace", raising)
    elif step == "fsync-folder":

        def second_fsync_fails(fd):
            calls["fsync"] += 1
            if calls["fsync"] == 2:
                raise failure
            return real_fsync(fd)

        monkeypatch.setattr(local.os, "fsync", second_fsync_fails)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_failure_at_any_step_leaves_one_key_that_opens_everything(keyring, old_key, new_key, step, failure,
                                                                  monkeypatch):
    provider, sealed, data_key = keyring
    # given the "check" step reads back through _open_blob: make it fail only after the old keyring was opened
    if step == "check":
        real_open = LocalKMSProvider._open_blob
        seen = {"n": 0}

        def open_then_fail(self, blob, master):
            seen["n"] += 1
            if seen["n"] > 1:
                raise failure
            return real_open(self, blob, master)

        monkeypatch.setattr(LocalKMSProvider, "_open_blob", open_then_fail)
    else:
        _fail_at(monkeypatch, step, failure)
    # when
    with pytest.raises((OSError, StorageUnavailable, KeyboardInterrupt)):
        provider.rekey(new_key)
    monkeypatch.undo()
    # then no temp file is left, and exactly one key opens the keyring with everything in it
    assert _leftovers(provider.path.parent) == []
    openers = [key for key in (old_key, new_key) if _opens(provider.path, key)]
    assert len(openers) == 1
    # (the rename happened only when the folder's fsync was what failed)
    assert (openers[0] == new_key) == (step == "fsync-folder")
    _all_open(LocalKMSProvider(provider.path, openers[0]), sealed, data_key)


def _opens(path: Path, key) -> bool:
    try:
        LocalKMSProvider(path, key).describe_key("payments")
    except ConfigurationError:
        return False
    return True


# The child re-keys and dies (os._exit, no clean-up at all) at one point; the parent checks the files.
CHILD = textwrap.dedent(
    """
    import base64, os, sys
    import keyvault.kms.local as local
    from keyvault.kms.local import LocalKMSProvider

    path, old, new, step = sys.argv[1:5]
    real_fsync, real_replace, real_bump = os.fsync, os.replace, LocalKMSProvider._bump_generation
    fsyncs = {"n": 0}

    def die():
        os._exit(9)

    def fsync(fd):
        fsyncs["n"] += 1
        if step == "after-temp-fsync" and fsyncs["n"] == 1:
            real_fsync(fd); die()
        if step == "after-rename" and fsyncs["n"] == 2:
            die()
        return real_fsync(fd)

    def replace(src, dst):
        if step == "before-rename":
            die()
        return real_replace(src, dst)

    def bump(self):
        if step == "before-announce":
            die()
        return real_bump(self)

    local.os.fsync, local.os.replace, LocalKMSProvider._bump_generation = fsync, replace, bump
    LocalKMSProvider(path, old).rekey(base64.b64decode(new))
    os._exit(0)
    """
)
KILL_POINTS = ("after-temp-fsync", "before-rename", "after-rename", "before-announce", "done")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_process_killed_at_any_point_leaves_old_or_new_state_fully_usable(keyring, old_key, new_key, point):
    provider, sealed, data_key = keyring
    # when a real process re-keys and dies at that point
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(provider.path), old_key, base64.b64encode(new_key).decode(), point],
        cwd=ROOT, capture_output=True, timeout=60,
    )
    assert child.returncode == (0 if point == "done" else 9), child.stderr.decode()
    # then exactly one of the two keys opens the keyring, holding everything made before
    openers = [key for key in (old_key, new_key) if _opens(provider.path, key)]
    assert openers == ([old_key] if point in ("after-temp-fsync", "before-rename") else [new_key])
    _all_open(LocalKMSProvider(provider.path, openers[0]), sealed, data_key)
    # and a re-keying run again with the same new key finishes the job from either state
    assert LocalKMSProvider(provider.path, old_key).rekey(new_key).already is (openers[0] == new_key)
    _all_open(LocalKMSProvider(provider.path, new_key), sealed, data_key)
    # (a temp file a killed process left is harmless: never a keyring, and 0600)
    for leftover in provider.path.parent.glob("*.tmp"):
        assert leftover.stat().st_mode & 0o777 == 0o600


def _create_keys_with_old_key(path: str, old_key: str, results) -> None:
    """Another process, configured with the old key: keeps creating keys until the keyring refuses it."""
    provider = LocalKMSProvider(path, old_key)
    created = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        name = f"k{len(created)}"
        try:
            provider.create_key(name)
        except ConfigurationError as exc:
            results.put((created, str(exc)))
            return
        created.append(name)
    results.put((created, ""))


def test_a_process_on_the_old_key_never_corrupts_the_rekeyed_keyring(keyring, old_key, new_key):
    provider, sealed, data_key = keyring
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    # given a process on the old key writing the keyring in a loop (a few keys made already)
    initial = provider.path.stat().st_size
    writer = context.Process(target=_create_keys_with_old_key, args=(str(provider.path), old_key, results))
    writer.start()
    deadline = time.monotonic() + 30
    while provider.path.stat().st_size < initial + 1000 and time.monotonic() < deadline:
        time.sleep(0.005)
    # when the keyring is re-keyed under it
    provider.rekey(new_key)
    created, refusal = results.get(timeout=90)
    writer.join(timeout=30)
    # then the writer was refused (it never wrote under the old key again), and every key it made is kept
    assert "cannot be opened with this master key" in refusal
    assert len(created) >= 3
    fresh = LocalKMSProvider(provider.path, new_key)
    for name in created:
        fresh.describe_key(name)
    _all_open(fresh, sealed, data_key)
    assert not _opens(provider.path, old_key)


def test_master_key_files_are_0600_exclusive_and_read_back(tmp_path):
    key = decode_master_key(generate_master_key())
    path = tmp_path / "new-key"
    write_master_key_file(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_master_key_file(path) == key
    with pytest.raises(ConfigurationError, match="exists already"):
        write_master_key_file(path, key)
    other = decode_master_key(generate_master_key())
    write_master_key_file(path, other, replace=True)
    assert read_master_key_file(path) == other and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["new-key"]
    (tmp_path / "bad").write_text("short\n")
    with pytest.raises(ConfigurationError, match="does not hold 32 random bytes"):
        read_master_key_file(tmp_path / "bad")
    with pytest.raises(ConfigurationError, match="unreadable"):
        read_master_key_file(tmp_path / "missing")
