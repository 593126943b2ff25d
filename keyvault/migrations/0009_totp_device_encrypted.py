"""TOTP secrets encrypted at rest; audit actions for account, role, device and SIEM consumer changes.

Devices move from django-otp's table (``otp_totp_totpdevice``, hex secret in clear)
to ``keyvault_totpdevice``, whose secret is an envelope under the field KEK
(``HMD_FIELD_ENCRYPTION_KEK``, created on the default provider if missing, as
enrolment does). django-otp's TOTP app is no longer installed and its table, the
clear secrets in it, is dropped once copied. Sessions verified with an old device
are asked for a code again; the codes themselves do not change.
"""

import django.db.models.deletion
import keyvault.keys.fields
import keyvault.models
from django.conf import settings
from django.db import migrations, models

LEGACY_TABLE = "otp_totp_totpdevice"
LEGACY_FIELDS = ("user_id", "name", "confirmed", "throttling_failure_timestamp", "throttling_failure_count",
                 "created_at", "last_used_at", "key", "step", "t0", "digits", "tolerance", "drift", "last_t")


def encrypt_legacy_devices(apps, schema_editor):
    """Copy django-otp's devices here with the secret sealed, then drop its table (the secrets in clear)."""
    connection = schema_editor.connection
    if LEGACY_TABLE not in connection.introspection.table_names():
        return  # a new installation: django-otp's TOTP app never ran here
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(quote(f) for f in LEGACY_FIELDS)} FROM {quote(LEGACY_TABLE)} ORDER BY id")
        rows = [dict(zip(LEGACY_FIELDS, row)) for row in cursor.fetchall()]
    if rows:
        from keyvault.access.accounts import ensure_field_kek  # the real service: it audits a KEK it has to create

        ensure_field_kek()
        Device = apps.get_model("keyvault", "TOTPDevice")
        for row in rows:
            created_at = row.pop("created_at")
            device = Device.objects.using(connection.alias).create(**row)  # the field seals the key
            Device.objects.using(connection.alias).filter(pk=device.pk).update(created_at=created_at)
    schema_editor.execute(f"DROP TABLE {quote(LEGACY_TABLE)}")


class Migration(migrations.Migration):

    dependencies = [
        ('keyvault', '0008_audit_append_only_everywhere'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField(
            model_name='auditevent',
            name='action',
            field=models.CharField(choices=[('kek.created', 'KEK created'), ('kek.enabled', 'KEK enabled'), ('kek.disabled', 'KEK disabled'), ('kek.deletion_scheduled', 'KEK deletion scheduled'), ('kek.deletion_cancelled', 'KEK deletion cancelled'), ('kek.destroyed', 'KEK destroyed'), ('kek.rotated', 'KEK rotated'), ('kek.updated', 'KEK settings changed'), ('version.state_changed', 'Key version state changed'), ('datakey.created', 'Data key created'), ('datakey.unwrapped', 'Data key unwrapped'), ('datakey.rewrapped', 'Data key rewrapped'), ('crypto.encrypt', 'Encrypt'), ('crypto.decrypt', 'Decrypt'), ('audit.exported', 'Audit log exported'), ('audit.checkpoint', 'Audit checkpoint signed'), ('audit.verified', 'Audit chain verified'), ('auth.login_failed', 'Login failed'), ('auth.access_denied', 'Access denied'), ('rotation', 'Rotation event'), ('rotation.started', 'Rotation run started'), ('rotation.state_changed', 'Rotation run state changed'), ('rotation.approved', 'Rotation run approved'), ('rotation.rejected', 'Rotation run rejected'), ('rotation.break_glass', 'Rotation approvals bypassed (break-glass)'), ('rotation.step_ticked', 'Runbook step ticked'), ('rotation.batch', 'Rotation batch rewrapped'), ('rotation.policy_changed', 'Rotation policy changed'), ('secret', 'Managed secret event'), ('user.created', 'User created'), ('user.changed', 'User changed (flags, groups, permissions)'), ('user.password_changed', 'User password changed'), ('user.deleted', 'User deleted'), ('group.created', 'Group created'), ('group.changed', 'Group changed (name, permissions)'), ('group.deleted', 'Group deleted'), ('2fa.device_created', 'Two-factor device created'), ('2fa.device_confirmed', 'Two-factor device confirmed'), ('2fa.device_deleted', 'Two-factor device deleted'), ('2fa.throttle_reset', 'Two-factor throttling reset'), ('siem.consumer_created', 'SIEM consumer created'), ('siem.consumer_changed', 'SIEM consumer changed'), ('other', 'Other')], db_index=True, editable=False, max_length=64, verbose_name='action'),
        ),
        migrations.CreateModel(
            name='TOTPDevice',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(help_text='The human-readable name of this device.', max_length=64)),
                ('confirmed', models.BooleanField(default=True, help_text='Is this device ready for use?')),
                ('throttling_failure_timestamp', models.DateTimeField(blank=True, default=None, help_text='A timestamp of the last failed verification attempt. Null if last attempt succeeded.', null=True)),
                ('throttling_failure_count', models.PositiveIntegerField(default=0, help_text='Number of successive failed attempts.')),
                ('created_at', models.DateTimeField(auto_now_add=True, help_text='The date and time when this device was initially created in the system.', null=True)),
                ('last_used_at', models.DateTimeField(blank=True, help_text='The most recent date and time this device was used.', null=True)),
                ('key', keyvault.keys.fields.EncryptedTextField(default=keyvault.models.new_totp_key, editable=False, help_text='Hex TOTP secret, envelope-encrypted; shown once, at enrolment.', verbose_name='secret')),
                ('step', models.PositiveSmallIntegerField(default=30, help_text='The time step in seconds.', verbose_name='time step (s)')),
                ('t0', models.BigIntegerField(default=0, help_text='The Unix time at which to begin counting steps.', verbose_name='t0')),
                ('digits', models.PositiveSmallIntegerField(choices=[(6, 6), (8, 8)], default=6, help_text='The number of digits to expect in a token.', verbose_name='digits')),
                ('tolerance', models.PositiveSmallIntegerField(default=1, help_text='The number of time steps in the past or future to allow.', verbose_name='tolerance')),
                ('drift', models.SmallIntegerField(default=0, help_text='The number of time steps the prover is known to deviate from our clock.', verbose_name='drift')),
                ('last_t', models.BigIntegerField(default=-1, help_text='The time step of the latest verified token; the next must be later.', verbose_name='last time step')),
                ('user', models.ForeignKey(help_text='The user that this device belongs to.', on_delete=django.db.models.deletion.CASCADE, to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'verbose_name': 'TOTP device',
                'verbose_name_plural': 'TOTP devices',
                'abstract': False,
                'default_permissions': ('view', 'delete'),
            },
        ),
        migrations.RunPython(encrypt_legacy_devices, migrations.RunPython.noop),
    ]
