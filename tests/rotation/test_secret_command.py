"""``manage.py secret``: registration at the shell through the same service and schema as the console form."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from keyvault.models import AuditEvent, ManagedSecret
from rotation import services
from rotation.exceptions import ConfigFieldError
from tests.rotation.executors.conftest import file_source  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db


def test_add_registers_through_the_service_with_typed_values_and_an_audit_event(file_source, capsys):  # noqa: F811
    file_source.write("app/api", "v1")

    call_command("secret", "add", "api", "--type", "generic", "--source", "file", "--path", "app/api",
                 "--set", "length=48", "--set", "alphabet=hex", "--owner", "team-a", "--warn-before", "30d")

    secret = ManagedSecret.objects.get(name="api")
    assert secret.config == {"length": 48, "alphabet": "hex"} and secret.owner == "team-a"
    assert secret.warn_before.days == 30 and secret.metadata["version"] == "1"
    assert "registered api (Generic secret) at file:app/api" in capsys.readouterr().out
    assert AuditEvent.objects.filter(action="secret", target_id="api", details__event="registered").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--source", "nope"], "field 'source': secret source 'nope' is not configured (configured: file"),
    (["--source", "file", "--set", "length=abc"], "config field 'length': must be an integer, not str"),
    (["--source", "file", "--set", "colour=red"], "config field 'colour': unknown key for this type"),
    (["--source", "file", "--config", '{"alphabet": "base32"}'], "config field 'alphabet': must be one of urlsafe, hex"),
    (["--source", "file", "--config", "[1]"], "--config is a JSON object"),
])
def test_add_refuses_a_bad_source_or_config_naming_the_field_and_saves_nothing(file_source, arguments, message):  # noqa: F811
    with pytest.raises((CommandError, ConfigFieldError)) as info:
        call_command("secret", "add", "api", "--type", "generic", "--path", "app/api", *arguments)
    assert message in str(info.value)
    assert not ManagedSecret.objects.exists()


def test_the_command_line_prints_one_error_line_and_exits_1(tmp_path):
    env = {**os.environ, "HMD_DATA_DIR": str(tmp_path), "HMD_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], check=True, env=env)
    result = subprocess.run(
        [sys.executable, "manage.py", "secret", "add", "db", "--type", "database_credential", "--source", "file",
         "--path", "db/app", "--config", '{"host": "db", "dbname": "app", "admin_dsn": "host=db", "retire": "drop"}'],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ConfigFieldError: config field 'retire': must be one of nologin, password (got 'drop')")


def test_change_merges_set_and_unset_into_the_config_and_re_points(file_source, system_actor, capsys):  # noqa: F811
    file_source.write("app/api", "v1")
    services.register_secret(name="api", secret_type="generic", source="file", path="app/api",
                             config={"length": 48, "alphabet": "hex"}, actor=system_actor)

    call_command("secret", "change", "api", "--set", "length=64", "--unset", "alphabet")

    assert ManagedSecret.objects.get(name="api").config == {"length": 64}
    assert AuditEvent.objects.filter(action="secret", target_id="api", details__event="repointed").exists()
    with pytest.raises(CommandError, match="config field 'length': must be from 16 to 1024"):
        call_command("secret", "change", "api", "--set", "length=4")
    assert ManagedSecret.objects.get(name="api").config == {"length": 64}


def test_schema_prints_the_table_the_docs_show(capsys):
    from rotation.executors import executor_for

    call_command("secret", "schema", "oauth_client_secret")
    out = capsys.readouterr().out
    assert out.startswith("oauth_client_secret (OAuth/OIDC client secret)\n")
    assert executor_for("oauth_client_secret").schema.markdown_table() in out


# -- rows saved under an older, looser schema ------------------------------------------------------------------


@pytest.fixture
def stale(file_source):  # noqa: F811
    """A generic secret whose stored config no longer validates (written before the schema existed)."""
    file_source.write("app/old", "v1")
    return ManagedSecret.objects.create(name="old", secret_type="generic", source="file", path="app/old",
                                        config={"length": "32", "note": "from 2025"})


def test_check_lists_stored_configs_that_no_longer_validate(stale, capsys):
    with pytest.raises(CommandError, match="1 managed secret"):
        call_command("secret", "check")
    assert "old (generic): config field 'note': unknown key" in capsys.readouterr().out

    call_command("secret", "change", "old", "--config", '{"length": 32}')
    call_command("secret", "check")
    assert "all 1 managed secret configuration(s) are valid" in capsys.readouterr().out


def test_the_daily_check_tells_the_owner_about_a_stale_configuration(stale, mailoutbox):
    flagged = services.flag_expiring_secrets()

    assert [secret.name for secret in flagged] == ["old"]
    reasons = AuditEvent.objects.get(action="secret", target_id="old", details__event="needs_attention").details["reasons"]
    assert reasons == ["configuration no longer valid: config field 'note': unknown key for this type (known: alphabet, "
                       "length) (manage.py secret change old)"]


def test_a_run_of_a_stale_secret_is_refused_at_start_naming_the_field(stale, system_actor):
    with pytest.raises(ConfigFieldError, match="config field 'note': unknown key .*manage.py secret change old"):
        services.start_run(secret=stale, actor=system_actor)


def test_a_run_whose_secret_went_stale_after_it_started_fails_with_the_field_not_a_crash(
    file_source, system_actor  # noqa: F811
):
    # given: a run queued on a valid secret, whose row is then changed behind the service's back
    file_source.write("app/api", "v1")
    secret = services.register_secret(name="api", secret_type="generic", source="file", path="app/api",
                                      actor=system_actor)
    with services.inline_dispatch():
        run = services.start_run(secret=secret, actor=system_actor)
        ManagedSecret.objects.filter(pk=secret.pk).update(config={"length": 8})
    # when: a worker picks it up
    run = services.drive(run.pk)
    # then: the run fails with the field named; the value was not touched
    assert run.state == "failed"
    assert "config field 'length': must be from 16 to 1024" in run.last_error
    assert file_source.read("app/api").version == "1"


# -- the console's add form -------------------------------------------------------------------------------------


@pytest.fixture
def admin_console(client):
    from tests.keyvault import make_role_user

    client.force_login(make_role_user("administrator"))
    return client


def test_the_add_form_shows_each_types_keys_and_puts_a_refusal_on_its_field(admin_console, file_source):  # noqa: F811
    page = admin_console.get("/keyvault/managedsecret/add/").content.decode()
    assert "<code>database_credential</code>: host* (host[,host…]); port (integer 1–65535)" in page
    # the source is a choice of the configured sources, not free text
    picker = re.search(r'<select name="source"[^>]*>(.*?)</select>', page, re.S)
    assert picker and re.findall(r'<option value="([^"]*)"', picker.group(1)) == ["", "file"]

    base = {"name": "api", "secret_type": "generic", "path": "app/api", "owner": "", "description": "",
            "warn_before": ""}
    unknown = admin_console.post("/keyvault/managedsecret/add/", {**base, "source": "nope", "config": "{}"})
    bad = admin_console.post("/keyvault/managedsecret/add/", {**base, "source": "file",
                                                              "config": json.dumps({"length": "many"})})

    assert unknown.status_code == bad.status_code == 200
    assert unknown.context["adminform"].form.errors["source"] == [
        "field 'source': secret source 'nope' is not configured (configured: file; each is configured by its "
        "HMD_* variables)"]
    assert bad.context["adminform"].form.errors["config"] == ["config field 'length': must be an integer, not str"]
    assert not ManagedSecret.objects.exists()


def test_rotation_status_of_a_secret_run_lists_its_steps_not_data_keys(file_source, system_actor, capsys):  # noqa: F811
    file_source.write("app/api", "v1")
    services.register_secret(name="api", secret_type="generic", source="file", path="app/api", actor=system_actor)
    call_command("rotation", "start", "--secret", "api", "--inline", "--id-only")
    run_id = capsys.readouterr().out.strip()

    call_command("rotation", "status", run_id)

    out = capsys.readouterr().out
    assert out.startswith(f"run #{run_id} on_demand of secret api: retiring\n  the old credential retires after ")
    assert "  [done] rotate.install (auto) by system:rotation-engine\n" in out
    assert "  [pending] rotate.consumers (manual)\n" in out and "rewrapped" not in out


def test_the_change_form_puts_a_refused_config_key_on_the_config_field_and_changes_nothing(
    admin_console, file_source, system_actor  # noqa: F811
):
    file_source.write("app/api", "v1")
    secret = services.register_secret(name="api", secret_type="generic", source="file", path="app/api",
                                      config={"length": 48}, actor=system_actor)

    response = admin_console.post(f"/keyvault/managedsecret/{secret.pk}/change/", {
        "source": "file", "path": "app/api", "owner": "", "description": "", "warn_before": "",
        "config": json.dumps({"length": 48, "alphabet": "base64"})})

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["config"] == [
        "config field 'alphabet': must be one of urlsafe, hex (got 'base64')"]
    assert ManagedSecret.objects.get(pk=secret.pk).config == {"length": 48}


def test_the_rotate_page_names_the_emergency_runbook_of_the_type(admin_console, file_source, system_actor):  # noqa: F811
    from rotation.executors.tls import _key_pem, _pem, issue

    key, _, cert = issue(common_name="dev.local", sans=["dev.local"])
    file_source.write("tls/dev", _pem(cert) + _key_pem(key))
    secret = services.register_secret(name="dev-tls", secret_type="tls_certificate", source="file", path="tls/dev",
                                      actor=system_actor, config={"common_name": "dev.local"})

    page = admin_console.get(f"/keyvault/managedsecret/{secret.pk}/rotate/").content.decode()

    assert "Runbook: TLS certificate renewal" in page
    assert "follows its own runbook, “Emergency TLS certificate rotation (compromised private key)”" in page


def test_a_stored_source_no_longer_configured_stays_shown_and_marked(file_source):  # noqa: F811
    from keyvault.console.secrets_admin import source_choices

    assert ("vault-old", "vault-old (not configured)") in source_choices("vault-old")
    assert [value for value, _ in source_choices("file")] == ["", "file"]
