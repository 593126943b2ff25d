"""File secrets: atomic 0600 writes, version history, reread on change, kubelet ``..data`` swaps."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keyvault.secrets import ReadOnlySource, SecretNotFound
from keyvault.secrets.env import EnvSource
from keyvault.secrets.files import FileSource


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def kubelet_publish(root: Path, generation: str, data: dict[str, str]) -> None:
    """Update a mounted Secret as the kubelet's AtomicWriter does.

    Write every key into a fresh ``..<timestamp>`` folder, point a new symlink at
    it and rename that over ``..data`` (an atomic swap); each key is a symlink
    ``key -> ..data/key`` created once.
    """
    target = root / f"..{generation}"
    target.mkdir()
    for key, value in data.items():
        (target / key).write_text(value)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, root / "..data")
    for key in data:
        link = root / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")


def test_write_is_atomic_with_mode_0600_and_keeps_history(tmp_path):
    source = FileSource(tmp_path / "secrets")

    source.write("payments/db", "one")
    source.write("payments/db", "two")

    live = tmp_path / "secrets" / "payments" / "db"
    assert live.read_text() == "two" and _mode(live) == 0o600
    history = tmp_path / "secrets" / ".versions" / "payments" / "db"
    assert sorted(os.listdir(history)) == ["1", "2"]
    assert all(_mode(history / n) == 0o600 for n in ("1", "2"))
    assert _mode(history) == 0o700
    assert not [p for p in live.parent.iterdir() if p.name.endswith(".tmp")]


def test_rotated_file_is_reread_without_restart(tmp_path):
    # given a secret file read once (and so cached)
    (tmp_path / "api-token").write_text("before\n")
    source = FileSource(tmp_path, read_only=True)
    assert source.read("api-token").value == "before"

    # when something else replaces it atomically, the same size and within the same second
    replacement = tmp_path / "api-token.new"
    replacement.write_text("after!\n")
    os.replace(replacement, tmp_path / "api-token")

    # then the next read sees the new value
    assert source.read("api-token").value == "after!"


def test_in_place_rewrite_is_reread(tmp_path):
    path = tmp_path / "token"
    path.write_text("aaaa")
    source = FileSource(tmp_path, read_only=True)
    assert source.read("token").value == "aaaa"

    path.write_text("bbbbbb")

    assert source.read("token").value == "bbbbbb"


def test_kubelet_symlink_swap_is_picked_up(tmp_path):
    # given a Secret volume as the kubelet lays it out
    kubelet_publish(tmp_path, "2024_01_01_00_00_00.1", {"password": "first", "username": "app"})
    source = FileSource(tmp_path, read_only=True)
    assert source.read("password").value == "first"

    # when the Secret is updated (new timestamped folder, ..data swapped, old folder removed)
    kubelet_publish(tmp_path, "2024_01_02_00_00_00.2", {"password": "second", "username": "app"})
    for old in (tmp_path / "..2024_01_01_00_00_00.1").iterdir():
        old.unlink()
    (tmp_path / "..2024_01_01_00_00_00.1").rmdir()

    # then the key reads the new value, and the kubelet's own entries are not secrets
    assert source.read("password").value == "second"
    with pytest.raises(SecretNotFound):
        source.read("..data")


def test_mounted_file_is_version_1_and_first_write_keeps_it(tmp_path):
    (tmp_path / "db").write_text("provisioned by hand\n")
    source = FileSource(tmp_path)
    assert [v.version for v in source.list_versions("db")] == ["1"]

    written = source.write("db", "rotated")

    assert written.version == "2"
    assert source.read("db", version="1").value == "provisioned by hand"
    assert source.read("db").value == "rotated"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside", "a/../b", ".versions/db/1", "a//b", ""])
def test_paths_cannot_escape_or_reach_hidden_files(tmp_path, bad):
    source = FileSource(tmp_path)

    with pytest.raises(SecretNotFound):
        source.read(bad)


def test_read_only_file_source_refuses_writes(tmp_path):
    source = FileSource(tmp_path, read_only=True)

    with pytest.raises(ReadOnlySource):
        source.write("x", "value")
    assert not (tmp_path / "x").exists()


def test_env_source_reads_file_variant_and_rereads_it(tmp_path, monkeypatch):
    secret_file = tmp_path / "key"
    secret_file.write_text("from-file\n")
    monkeypatch.delenv("HMD_TEST_FILE_SECRET", raising=False)
    monkeypatch.setenv("HMD_TEST_FILE_SECRET_FILE", str(secret_file))
    source = EnvSource()
    assert source.read("test-file-secret").value == "from-file"

    replacement = tmp_path / "key.new"
    replacement.write_text("rotated\n")
    os.replace(replacement, secret_file)

    assert source.read("HMD_TEST_FILE_SECRET").value == "rotated"
