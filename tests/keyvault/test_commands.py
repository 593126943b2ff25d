"""``manage.py kms`` and ``manage.py audit`` as an operator runs them, in a scratch instance."""

import base64
import re
import json

import pytest

from tests.scratch import make_scratch
from tests.volumes import fill, tiny_volume


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    instance = make_scratch(tmp_path_factory.mktemp("scratch"))
    instance.run("kms", "create-key", "default")
    return instance


def test_health_reports_local_provider_healthy(scratch):
    result = scratch.run("kms", "health")

    assert result.stdout.decode().startswith("local: healthy")


def test_encrypt_decrypt_pipeline_with_context(scratch):
    result = scratch.shell(
        "printf 'top secret' | python manage.py kms encrypt --key default --context tenant=a"
        " | python manage.py kms decrypt --context tenant=a"
    )

    assert result.stdout == "top secret"


def test_wrong_context_fails_with_one_line(scratch):
    result = scratch.shell(
        "printf 'top secret' | python manage.py kms encrypt --key default --context tenant=a"
        " | python manage.py kms decrypt --context tenant=b",
        check=False,
    )

    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: InvalidCiphertext: ciphertext could not be decrypted"]


def test_unknown_key_and_bad_input_are_one_line_errors(scratch):
    unknown = scratch.run("kms", "encrypt", "--key", "nope", input=b"x", check=False)
    bad_b64 = scratch.run("kms", "decrypt", input=b"%%%not base64", check=False)
    bad_context = scratch.run("kms", "encrypt", "--key", "default", "--context", "novalue", input=b"x", check=False)

    for result, needle in ((unknown, "no KEK named 'nope'"), (bad_b64, "not base64"), (bad_context, "key=value")):
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in lines[0]


def test_rotate_and_describe(scratch):
    scratch.run("kms", "create-key", "rotating")
    before = scratch.run("kms", "encrypt", "--key", "rotating", input=b"old").stdout

    rotated = json.loads(scratch.run("kms", "rotate-key", "rotating", "--json").stdout)
    described = json.loads(scratch.run("kms", "describe-key", "rotating", "--json").stdout)

    assert rotated == {"name": "rotating", "primary_version": 2}
    assert [(v["version"], v["primary"]) for v in described["versions"]] == [(1, False), (2, True)]
    assert scratch.run("kms", "decrypt", input=before).stdout == b"old"


def test_create_key_gives_the_key_its_rotation_policy_and_describe_shows_it(scratch):
    scratch.run("kms", "create-key", "weekly", "--rotation-period-days", "7")
    refused = scratch.run("kms", "create-key", "never", "--rotation-period-days", "0", check=False)

    described = json.loads(scratch.run("kms", "describe-key", "weekly", "--json").stdout)
    policy = scratch.run("rotation", "policy", "--kek", "weekly").stdout.decode()
    text = scratch.run("kms", "describe-key", "weekly").stdout.decode()

    assert described["rotation_period"] == "1w" and described["next_rotation_at"]
    assert "every 1w" in policy and f"rotation every 1w, next {described['next_rotation_at']}" in text
    assert refused.returncode == 1 and "--rotation-period-days must be at least 1" in refused.stderr.decode()
    assert scratch.run("kms", "describe-key", "never", check=False).returncode == 1


def test_generate_data_key_hides_plaintext_unless_asked(scratch):
    hidden = json.loads(scratch.run("kms", "generate-data-key", "--key", "default", "--context", "app=x").stdout)
    shown = json.loads(
        scratch.run("kms", "generate-data-key", "--key", "default", "--context", "app=x", "--show-plaintext").stdout
    )

    assert "plaintext" not in hidden
    assert len(base64.b64decode(shown["plaintext"])) == 32
    assert hidden["encryption_context"] == {"app": "x"}
    wrapped = base64.b64encode(base64.b64decode(shown["ciphertext"]))
    assert scratch.run("kms", "decrypt", "--context", "app=x", input=wrapped).stdout == base64.b64decode(shown["plaintext"])


def test_audit_verify_and_export(scratch):
    verify = scratch.run("audit", "verify")
    export = scratch.run("audit", "export", "--format", "jsonl")
    csv_export = scratch.run("audit", "export", "--format", "csv", "--since", "2000-01-01")

    assert verify.stdout.decode().startswith("OK: audit chain intact")
    rows = [json.loads(line) for line in export.stdout.decode().splitlines()]
    assert rows[0]["sequence"] == 1 and rows[0]["action"] == "kek.created"
    assert {"kek.created", "crypto.encrypt", "crypto.decrypt", "audit.verified"} <= {r["action"] for r in rows}
    assert csv_export.stdout.decode().splitlines()[0].startswith("sequence,timestamp,actor,action")


def test_audit_checkpoint(scratch):
    result = scratch.run("audit", "checkpoint")

    assert result.stdout.decode().startswith("signed checkpoint at #")
    verified = re.search(r"(\d+) signed checkpoints verified", scratch.run("audit", "verify").stdout.decode())
    assert verified and int(verified.group(1)) >= 1


def test_audit_verify_sets_the_consoles_chain_banner(scratch):
    """The CLI and the console's "Verify now" are one service: a CLI pass is the banner's full verification."""
    read_banner = ("from keyvault.models import AuditVerification as V; v = V.objects.filter(pk=1).first(); "
                   "print(v.full_verified_at is not None if v else False, v.anchor_sequence if v else 0)")
    scratch.run("kms", "encrypt", "--key", "default", input=b"x")

    scratch.run("audit", "verify")
    verified, anchor = scratch.run("shell", "-c", read_banner).stdout.decode().splitlines()[-1].split()

    assert verified == "True" and int(anchor) > 0


def test_audit_verify_takes_a_number_of_jobs(scratch):
    verify = scratch.run("audit", "verify", "--jobs", "2")
    refused = scratch.run("audit", "verify", "--jobs", "0", check=False)

    assert verify.stdout.decode().startswith("OK: audit chain intact")
    assert refused.returncode == 2 and "--jobs: expected a whole number of at least 1" in refused.stderr.decode()


def test_bad_date_is_a_clear_error(scratch):
    result = scratch.run("audit", "export", "--since", "yesterday", check=False)

    assert result.returncode == 1 and "not a date" in result.stderr.decode()


# -- a keyring volume that fills up (a real 16 KiB tmpfs) ------------------------------


def one_error_line(result) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1, result.stderr.decode()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_a_full_keyring_volume_gives_one_line_errors_and_nothing_half_made(tmp_path):
    with tiny_volume(tmp_path / "volume") as volume:
        # given an instance whose keyring lives on a volume that fills up after one key and one ciphertext
        keyring = volume / "local-kms.keyring"
        instance = make_scratch(tmp_path / "data", HMD_LOCAL_KMS_KEYRING=str(keyring))
        instance.run("kms", "create-key", "before")
        sealed = instance.run("kms", "encrypt", "--key", "before", input=b"made before").stdout
        fill(volume)

        # when an operator creates a key, encrypts, makes a data key and checks health, each a new process
        create = instance.run("kms", "create-key", "after", check=False)
        encrypt = instance.run("kms", "encrypt", "--key", "before", input=b"x", check=False)
        data_key = instance.run("kms", "generate-data-key", "--key", "before", check=False)
        health = instance.run("kms", "health", check=False)

        # then each fails with one line naming the keyring and the reason, and exit status 1
        reason = f"local keyring {keyring}: No space left on device [ENOSPC]"
        assert one_error_line(create).startswith(f"error: StorageUnavailable: cannot write {reason}")
        for refused in (encrypt, data_key):
            line = one_error_line(refused)
            assert line.startswith("error: StorageUnavailable: version 1 of 'before' cannot encrypt in this process")
            assert reason in line
        assert one_error_line(health) == "error: unhealthy: local"
        assert health.stdout.decode().startswith("local: UNHEALTHY")
        assert reason in health.stdout.decode()

        # and the half-made key exists nowhere, while what was made before still opens
        missing = instance.run("kms", "describe-key", "after", check=False)
        assert "no KEK named 'after'" in one_error_line(missing)
        assert instance.run("kms", "decrypt", input=sealed).stdout == b"made before"
