"""``manage.py kms rekey-local`` (keyvault.keys.master_key) on scratch instances, as operators run it.

Given an instance with KEKs, data keys and ciphertexts, when its keyring is re-keyed, then
every data key made before still unwraps, the old master key no longer opens the keyring,
the key files are 0600, the audit chain records it, and a bad new key file is a one-line
typed error that changes nothing.
"""

from __future__ import annotations

import json

import pytest

from keyvault.kms.local import generate_master_key
from tests.scratch import make_scratch

pytestmark = pytest.mark.slow

UNWRAP_ALL = (
    "from keyvault.audit import Actor; from keyvault.keys import services; from keyvault.models import DataKey; "
    "keys = list(DataKey.objects.all()); "
    "[services.unwrap_data_key(k, actor=Actor.system('test')) for k in keys]; print('unwrapped', len(keys))"
)


def _populate(scratch) -> str:
    scratch.run("kms", "create-key", "payments")
    for owner in ("a", "b", "c"):
        scratch.run("kms", "generate-data-key", "--key", "payments", "--owner", owner)
    scratch.run("kms", "rotate-key", "payments")
    scratch.run("kms", "generate-data-key", "--key", "payments", "--owner", "d")
    return scratch.run("kms", "encrypt", "--key", "payments", input="card 4111").stdout.decode()


def _one_line_error(result, *fragments: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.startswith("error: ConfigurationError: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_development_instance_is_rekeyed_in_place(tmp_path):
    # given a development instance (master key generated into HMD_DATA_DIR) with data keys and a ciphertext
    scratch = make_scratch(tmp_path / "data")
    sealed = _populate(scratch)
    dev_file = scratch.data_dir / "local_kms_master_key"
    old_key = dev_file.read_text().strip()
    # when
    out = scratch.run("kms", "rekey-local").stdout.decode()
    # then the new key was generated into its own 0600 file and the development file holds it too
    assert "re-encrypted under the master key in" in out and "nothing to switch" in out
    generated = [p for p in scratch.data_dir.iterdir() if p.name.startswith("local_kms_master_key.")]
    assert len(generated) == 1
    new_key = generated[0].read_text().strip()
    assert new_key != old_key and dev_file.read_text().strip() == new_key
    for path in (generated[0], dev_file, scratch.data_dir / "local-kms.keyring"):
        assert path.stat().st_mode & 0o777 == 0o600
    assert scratch.data_dir.stat().st_mode & 0o777 == 0o700
    # and every data key made before still unwraps, and the ciphertext still decrypts
    assert "unwrapped 4" in scratch.run("shell", "-c", UNWRAP_ALL).stdout.decode()
    assert scratch.run("kms", "decrypt", input=sealed).stdout == b"card 4111"
    # and the old master key no longer opens the keyring
    scratch.extra_env["HMD_LOCAL_KMS_MASTER_KEY"] = old_key
    _one_line_error(scratch.run("kms", "decrypt", input=sealed, check=False), "cannot be opened with this master key")
    del scratch.extra_env["HMD_LOCAL_KMS_MASTER_KEY"]
    # and the audit chain records the re-keying (with a fingerprint, never the key) and verifies
    scratch.run("audit", "verify")
    events = scratch.run("shell", "-c", (
        "import json; from keyvault.models import AuditEvent; "
        "print(json.dumps([e.details for e in AuditEvent.objects.filter(action='kms.master_key_rekeyed')]))"
    )).stdout.decode()
    (details,) = json.loads(events.strip().splitlines()[-1])
    assert details["keys"] == 1 and details["generated"] is True and details["already_rekeyed"] is False
    assert details["new_key_file"] == str(generated[0]) and details["new_key_fingerprint"].startswith("sha256:")
    assert new_key not in events and old_key not in events


def test_configured_instance_switches_to_the_new_key_file(tmp_path):
    # given an instance whose master key is configured through HMD_LOCAL_KMS_MASTER_KEY_FILE
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    old_file, new_file = secrets / "master-key", secrets / "master-key.new"
    old_file.write_text(generate_master_key() + "\n")
    new_file.write_text(generate_master_key() + "\n")
    old_file.chmod(0o600)
    new_file.chmod(0o600)
    scratch = make_scratch(tmp_path / "data", HMD_LOCAL_KMS_MASTER_KEY_FILE=str(old_file))
    sealed = _populate(scratch)
    # when the operator re-keys with the new key file
    out = scratch.run("kms", "rekey-local", "--new-master-key-file", str(new_file)).stdout.decode()
    # then the command says what to switch, and processes still on the old key are refused
    assert f"HMD_LOCAL_KMS_MASTER_KEY_FILE={new_file}" in out
    _one_line_error(scratch.run("kms", "decrypt", input=sealed, check=False), "cannot be opened with this master key")
    assert not (scratch.data_dir / "local_kms_master_key").exists()
    # and running it again before the switch (as after a run stopped past its swap) finishes without writing
    keyring = (scratch.data_dir / "local-kms.keyring").read_bytes()
    again = scratch.run("kms", "rekey-local", "--new-master-key-file", str(new_file)).stdout.decode()
    assert "was already sealed under" in again
    assert (scratch.data_dir / "local-kms.keyring").read_bytes() == keyring
    # and after the switch everything made before opens
    scratch.extra_env["HMD_LOCAL_KMS_MASTER_KEY_FILE"] = str(new_file)
    assert scratch.run("kms", "decrypt", input=sealed).stdout == b"card 4111"
    assert "unwrapped 4" in scratch.run("shell", "-c", UNWRAP_ALL).stdout.decode()
    scratch.run("audit", "verify")


def test_a_bad_new_key_file_is_a_one_line_error_and_changes_nothing(tmp_path):
    scratch = make_scratch(tmp_path / "data")
    # (before any key exists there is nothing to re-key, and the key it generated is removed again)
    _one_line_error(scratch.run("kms", "rekey-local", check=False), "there is no local keyring at")
    sealed = _populate(scratch)
    keyring = scratch.data_dir / "local-kms.keyring"
    before = keyring.read_bytes()
    garbage, loose, missing = tmp_path / "garbage", tmp_path / "loose", tmp_path / "missing"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    loose.write_text(generate_master_key() + "\n")
    loose.chmod(0o644)
    unreadable = tmp_path / "a-folder"
    unreadable.mkdir()
    cases = {
        missing: "unreadable: No such file or directory",
        unreadable: "unreadable: Is a directory",
        garbage: "does not hold 32 random bytes",
        loose: "readable by others; chmod 600 it first",
        scratch.data_dir / "local_kms_master_key": "is the one the keyring is sealed with already",
    }
    for path, message in cases.items():
        _one_line_error(scratch.run("kms", "rekey-local", "--new-master-key-file", str(path), check=False), message)
    # then nothing changed: same keyring bytes, the configured key opens it, no key file was generated
    assert keyring.read_bytes() == before
    assert scratch.run("kms", "decrypt", input=sealed).stdout == b"card 4111"
    assert not [p for p in scratch.data_dir.iterdir() if p.name.startswith("local_kms_master_key.")]
