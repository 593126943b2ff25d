"""The external witness of the audit chain (issue 12, finding 1): written outside the database, verified against.

The attacks are those of ``test_chain.py`` (a database owner rewrites the chain and deletes
checkpoints), plus the one only a witness catches: truncating the tail past a checkpoint.
"""

import json
import socket
import stat
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.audit import status as audit_status
from keyvault.audit import witness as audit_witness
from keyvault.audit.witness import WitnessEntry
from keyvault.exceptions import AuditVerificationTooSoon
from keyvault.models import AuditCheckpoint, AuditEvent
from keyvault.tasks import audit_checkpoint
from tests.keyvault.audit.test_chain import attack_delete_and_renumber, attack_edit_and_rehash, owner_sql, record_events

pytestmark = pytest.mark.django_db


@pytest.fixture
def witness_file(settings, tmp_path):
    """The default witness: a file under a (fresh) data folder; checkpoints every 3 events."""
    path = tmp_path / "data" / "audit-witness.jsonl"
    settings.AUDIT_WITNESS = [str(path)]
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    yield path
    cache.delete(audit_witness.FAILURE_CACHE_KEY)


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run a function and then the on-commit hooks it queued, as a committed transaction would."""
    def run(function, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return function(*args, **kwargs)
    return run


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- writing -------------------------------------------------------------------------------------


def test_every_checkpoint_is_appended_to_a_0600_witness_file(witness_file, committed):
    # given checkpoints at #3 and #6, each committed
    committed(record_events, 7)

    # then the witness file holds exactly the database's checkpoints, one JSON line each, readable only by us
    assert stat.S_IMODE(witness_file.stat().st_mode) == 0o600
    stored = [WitnessEntry.of(cp).as_dict() for cp in AuditCheckpoint.objects.order_by("sequence")]
    assert lines(witness_file) == stored and [line["sequence"] for line in stored] == [3, 6]
    assert set(stored[0]) == {"sequence", "event_hash", "prev_signature", "signature", "public_key", "signed_at"}

    # when another checkpoint is signed, the earlier lines stay byte for byte and one line is appended
    before = witness_file.read_bytes()
    committed(record_events, 2)
    after = witness_file.read_bytes()
    assert after.startswith(before) and [line["sequence"] for line in lines(witness_file)] == [3, 6, 9]


def test_a_rolled_back_checkpoint_is_never_witnessed(witness_file, committed):
    # given the transaction holding checkpoint #3 rolls back
    def record_and_fail():
        with transaction.atomic():
            record_events(3)
            raise RuntimeError("the operation failed")

    with pytest.raises(RuntimeError):
        committed(record_and_fail)

    # then nothing outside the database claims it
    assert not witness_file.exists()


def test_a_witness_that_cannot_be_written_never_loses_the_checkpoint(witness_file, committed, caplog, tmp_path):
    # given a witness destination that cannot be written (its folder is a file)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    witness_file.parent.mkdir()
    from django.conf import settings
    settings.AUDIT_WITNESS = [str(witness_file), str(blocker / "witness.jsonl")]

    # when a checkpoint is signed
    committed(record_events, 3)

    # then it is in the database and the good witness, the failure is logged loudly and shown on the banner
    assert AuditCheckpoint.objects.filter(sequence=3).exists()
    assert [line["sequence"] for line in lines(witness_file)] == [3]
    assert any(r.levelname == "ERROR" and "AUDIT WITNESS WRITE FAILED" in r.getMessage() for r in caplog.records)
    assert "checkpoint #3" in audit_status.chain_status().witness_problem

    # and a later write that succeeds everywhere clears it
    settings.AUDIT_WITNESS = [str(witness_file)]
    committed(record_events, 3)
    assert audit_witness.last_failure() == ""


class _Collector(BaseHTTPRequestHandler):
    """A local HTTP endpoint: records POSTed JSON, serves ``body`` on GET."""

    def do_POST(self):  # noqa: N802
        self.server.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def do_GET(self):  # noqa: N802
        body = self.server.body.encode()
        self.send_response(200 if self.path == "/witness.jsonl" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.received, server.body = [], ""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_webhook_witness_receives_each_checkpoint(settings, http_server, committed):
    settings.AUDIT_CHECKPOINT_INTERVAL = 2
    settings.AUDIT_WITNESS = [f"http://127.0.0.1:{http_server.server_port}/checkpoints"]

    committed(record_events, 4)

    assert http_server.received == [WitnessEntry.of(cp).as_dict() for cp in AuditCheckpoint.objects.order_by("sequence")]


def test_a_webhook_witness_refuses_plain_http_off_host():
    witness = audit_witness.destination("http://collector.example.com/in?token=s3cret")

    with pytest.raises(audit_witness.AuditWitnessUnavailable, match="https only"):
        witness.write(WitnessEntry(1, "a" * 64, "", "b" * 128, "c" * 64, "2026-01-01T00:00:00.000000Z"))
    assert "s3cret" not in witness.description


def test_a_syslog_witness_sends_each_checkpoint(settings, committed):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    settings.AUDIT_CHECKPOINT_INTERVAL = 2
    settings.AUDIT_WITNESS = [f"syslog://127.0.0.1:{receiver.getsockname()[1]}"]
    try:
        committed(record_events, 2)
        message = receiver.recv(65536).decode()
    finally:
        receiver.close()

    assert "keyvault-audit-checkpoint" in message
    assert json.loads(message[message.index("{"):].rstrip("\x00")) == WitnessEntry.of(AuditCheckpoint.objects.get()).as_dict()


# -- verifying against the witness -----------------------------------------------------------------


def test_verify_reports_how_far_the_witness_vouches(witness_file, committed):
    committed(record_events, 7)

    result = audit.verify_chain()

    assert result.ok, str(result)
    assert f"witnessed to #6 (2 checkpoints in {witness_file})" in str(result)


def test_rewriting_the_chain_is_caught_by_the_witness(witness_file, committed):
    # given #3, #6, #9 witnessed; the owner edits #2, re-hashes, moves the head, deletes all checkpoints
    committed(record_events, 10)
    attack_edit_and_rehash()

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 3
    assert "witnessed checkpoint #3 is missing from the database" in result.reason


def test_deleting_and_renumbering_is_caught_by_the_witness(witness_file, committed):
    committed(record_events, 10)
    attack_delete_and_renumber()

    result = audit.verify_chain()

    assert not result.ok and "witnessed checkpoint #3 is missing" in result.reason


def test_truncating_the_tail_past_a_checkpoint_is_chain_shorter_than_witnessed(witness_file, committed):
    # given #3, #6, #9 witnessed; the owner deletes #8..#10 and checkpoint #9 and moves the head back to #7,
    # which leaves a chain the density rule alone accepts (before the fix: OK)
    committed(record_events, 10)
    head = AuditEvent.objects.get(sequence=7)
    owner_sql(("DELETE FROM keyvault_auditevent WHERE sequence > 7", []),
              ("DELETE FROM keyvault_auditcheckpoint WHERE sequence > 7", []),
              ("UPDATE keyvault_auditchainhead SET last_sequence = 7, last_hash = %s", [head.hash]))

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 8
    assert "chain shorter than witnessed" in result.reason and "#9" in result.reason
    assert audit.verify_chain(use_witness=False).ok  # what verify said before there was a witness


def test_a_checkpoint_that_differs_from_the_witnessed_one_is_broken(witness_file, committed):
    committed(record_events, 4)
    assert audit.verify_chain().ok
    line = lines(witness_file)[0]
    witness_file.write_text(json.dumps({**line, "signed_at": "2020-01-01T00:00:00.000000Z"}) + "\n")

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 3 and "differs from the witnessed one" in result.reason


def test_a_forged_witness_line_is_broken(witness_file, committed):
    committed(record_events, 3)
    line = lines(witness_file)[0]
    with witness_file.open("a") as handle:
        handle.write(json.dumps({**line, "sequence": 99}) + "\n")

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 99 and "signature is invalid" in result.reason


def test_a_missing_witness_file_is_broken_unless_told_otherwise(witness_file, committed):
    # given checkpoints in the database, and the witness file gone
    committed(record_events, 4)
    witness_file.unlink()

    result = audit.verify_chain()

    assert not result.ok and result.reason.startswith("witness missing")
    assert audit.verify_chain(use_witness=False).ok


def test_a_fresh_install_without_checkpoints_needs_no_witness_file(witness_file):
    record_events(2)

    result = audit.verify_chain()

    assert result.ok and not witness_file.exists()


def test_verify_against_an_auditors_copy_file(witness_file, committed, tmp_path):
    # given the auditor kept a copy while the chain reached #6
    committed(record_events, 7)
    copy = tmp_path / "auditor-copy.jsonl"
    copy.write_bytes(witness_file.read_bytes())
    # when the owner truncates the log and the local witness to #3
    head = AuditEvent.objects.get(sequence=4)
    owner_sql(("DELETE FROM keyvault_auditevent WHERE sequence > 4", []),
              ("DELETE FROM keyvault_auditcheckpoint WHERE sequence > 4", []),
              ("UPDATE keyvault_auditchainhead SET last_sequence = 4, last_hash = %s", [head.hash]))
    witness_file.write_text(witness_file.read_text().splitlines()[0] + "\n")

    # then the local witness is fooled, the auditor's copy is not
    assert audit.verify_chain().ok
    result = audit.verify_chain(witness=str(copy))
    assert not result.ok and "chain shorter than witnessed" in result.reason


def test_verify_against_a_witness_served_over_http(witness_file, committed, http_server):
    committed(record_events, 7)
    http_server.body = witness_file.read_text()
    url = f"http://127.0.0.1:{http_server.server_port}/witness.jsonl"

    assert audit.verify_chain(witness=url).ok

    owner_sql(("DELETE FROM keyvault_auditcheckpoint WHERE sequence = 6", []))
    result = audit.verify_chain(witness=url)
    assert not result.ok and "witnessed checkpoint #6 is missing" in result.reason

    missing = audit.verify_chain(witness=url.replace("witness.jsonl", "nothing"))
    assert not missing.ok and "cannot be read" in missing.reason


def test_an_s3_witness_with_object_lock_is_written_and_verified(settings, committed, moto_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint_url)
    bucket = f"witness-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    settings.AUDIT_WITNESS = [f"s3://{bucket}/audit"]
    settings.AUDIT_WITNESS_S3_LOCK_MODE = "COMPLIANCE"

    committed(record_events, 7)

    head = boto3.client("s3").head_object(Bucket=bucket, Key=f"audit/{3:020d}.json")
    assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"]
    assert audit.verify_chain(witness=f"s3://{bucket}/audit").ok
    owner_sql(("DELETE FROM keyvault_auditcheckpoint", []))
    result = audit.verify_chain(witness=f"s3://{bucket}/audit")
    assert not result.ok and "witnessed checkpoint #3 is missing" in result.reason


def test_audit_verify_command_takes_a_witness_copy_or_none(witness_file, committed, tmp_path, capsys):
    committed(record_events, 4)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(witness_file.read_bytes())
    witness_file.unlink()

    with pytest.raises(CommandError, match="witness missing"):
        call_command("audit", "verify")
    call_command("audit", "verify", "--witness", str(copy))
    assert f"witnessed to #3 (1 checkpoints in {copy})" in capsys.readouterr().out
    call_command("audit", "verify", "--no-witness")
    assert "witness not checked (--no-witness)" in capsys.readouterr().out


# -- time-based checkpoints ------------------------------------------------------------------------


def test_beat_signs_the_head_only_when_it_moved(witness_file, committed):
    # given an idle chain: nothing to sign
    assert committed(audit_checkpoint) is None
    record_events(2)

    # when the beat task runs after events were appended, it signs the head without adding an event
    assert committed(audit_checkpoint) == 2
    assert AuditEvent.objects.count() == 2
    assert [line["sequence"] for line in lines(witness_file)] == [2]

    # and on the next tick, with nothing new, it does nothing
    assert committed(audit_checkpoint) is None
    assert AuditCheckpoint.objects.count() == 1
    assert audit.verify_chain().ok


def test_beat_runs_the_checkpoint_task_every_audit_checkpoint_seconds(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["audit-checkpoint"]

    assert entry == {"task": "keyvault.audit_checkpoint", "schedule": settings.AUDIT_CHECKPOINT_SECONDS}
    assert settings.AUDIT_CHECKPOINT_SECONDS == 60.0


# -- "Verify now" rate limit ---------------------------------------------------------------------


def test_verify_now_runs_once_per_interval(settings):
    settings.AUDIT_VERIFY_NOW_SECONDS = 60
    cache.delete(audit_status.VERIFY_NOW_CACHE_KEY)
    record_events(2)
    try:
        assert audit_status.verify_fully(actor=Actor.system("tests")).ok

        with pytest.raises(AuditVerificationTooSoon) as refused:
            audit_status.verify_fully(actor=Actor.system("tests"))
        assert 0 < refused.value.retry_after <= 60
        # another process with its own cache sees the verification recorded in the log
        cache.delete(audit_status.VERIFY_NOW_CACHE_KEY)
        with pytest.raises(AuditVerificationTooSoon):
            audit_status.verify_fully(actor=Actor.system("tests"))
        assert AuditEvent.objects.filter(action=Action.AUDIT_VERIFIED).count() == 1
    finally:
        cache.delete(audit_status.VERIFY_NOW_CACHE_KEY)


def test_check_deploy_warns_when_no_witness_file_is_kept(settings, tmp_path):
    from keyvault.audit import checks as checks_audit

    # a witness file (alone or beside a remote witness) is enough
    settings.AUDIT_WITNESS = [str(tmp_path / "witness.jsonl"), "s3://audit-bucket/keyvault"]
    assert checks_audit.check_a_witness_file_is_kept() == []

    # only remote witnesses, or none: routine verification could not see a cut-back chain
    for witnesses in (["s3://audit-bucket/keyvault"], ["none"]):
        settings.AUDIT_WITNESS = witnesses
        [warning] = checks_audit.check_a_witness_file_is_kept()
        assert warning.id == "keyvault.W305" and "no witness file" in warning.msg
