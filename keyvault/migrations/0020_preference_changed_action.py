# A console user's time-zone change is audited: the user.preference_changed action (issue 16).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('keyvault', '0019_datakey_fingerprint'),
    ]

    operations = [
        migrations.AlterField(
            model_name='auditevent',
            name='action',
            field=models.CharField(choices=[('kek.created', 'KEK created'), ('kek.enabled', 'KEK enabled'), ('kek.disabled', 'KEK disabled'), ('kek.deletion_scheduled', 'KEK deletion scheduled'), ('kek.deletion_cancelled', 'KEK deletion cancelled'), ('kek.destroyed', 'KEK destroyed'), ('kek.rotated', 'KEK rotated'), ('kek.updated', 'KEK settings changed'), ('version.state_changed', 'Key version state changed'), ('datakey.created', 'Data key created'), ('datakey.unwrapped', 'Data key unwrapped'), ('datakey.rewrapped', 'Data key rewrapped'), ('datakey.destroyed', 'Data key destroyed'), ('crypto.encrypt', 'Encrypt'), ('crypto.decrypt', 'Decrypt'), ('audit.exported', 'Audit log exported'), ('audit.checkpoint', 'Audit checkpoint signed'), ('audit.verified', 'Audit chain verified'), ('auth.login_failed', 'Login failed'), ('auth.access_denied', 'Access denied'), ('rotation', 'Rotation event'), ('rotation.started', 'Rotation run started'), ('rotation.state_changed', 'Rotation run state changed'), ('rotation.approved', 'Rotation run approved'), ('rotation.rejected', 'Rotation run rejected'), ('rotation.break_glass', 'Rotation approvals bypassed (break-glass)'), ('rotation.step_ticked', 'Runbook step ticked'), ('rotation.batch', 'Rotation batch rewrapped'), ('rotation.policy_changed', 'Rotation policy changed'), ('secret', 'Managed secret event'), ('user.created', 'User created'), ('user.changed', 'User changed (flags, groups, permissions)'), ('user.password_changed', 'User password changed'), ('user.deleted', 'User deleted'), ('user.preference_changed', 'User preference changed (time zone)'), ('group.created', 'Group created'), ('group.changed', 'Group changed (name, permissions)'), ('group.deleted', 'Group deleted'), ('2fa.device_created', 'Two-factor device created'), ('2fa.device_confirmed', 'Two-factor device confirmed'), ('2fa.device_deleted', 'Two-factor device deleted'), ('2fa.throttle_reset', 'Two-factor throttling reset'), ('siem.consumer_created', 'SIEM consumer created'), ('siem.consumer_changed', 'SIEM consumer changed'), ('api.client_created', 'API client created'), ('api.client_changed', 'API client changed (token rotated, revoked)'), ('api.denied', 'API call refused'), ('api.read', 'API metadata read'), ('kms.master_key_rekeyed', 'Local KMS keyring re-keyed under a new master key'), ('other', 'Other')], db_index=True, editable=False, max_length=64, verbose_name='action'),
        ),
    ]
