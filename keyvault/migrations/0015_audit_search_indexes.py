# Indexes for the audit list's search and outcome filter (issue 16). The outcome column already
# existed (set by every keyvault.audit.events constructor): no data migration needed.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('keyvault', '0014_console_preference'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['timestamp', 'sequence'], name='audit_time_seq'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['actor', 'sequence'], name='audit_actor_seq'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['action', 'sequence'], name='audit_action_seq'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['target_id', 'sequence'], name='audit_target_id_seq'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['request_id', 'sequence'], name='audit_request_id_seq'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['outcome', 'sequence'], name='audit_outcome_seq'),
        ),
    ]
