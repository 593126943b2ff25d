# Partitions become leased rows (replacing the partitions_outstanding counter), the engine gains a
# transactional outbox, and a paused run records when its task tries again (issue 14).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('rotation', '0003_runs_retiring_do_not_block'),
    ]

    operations = [
        migrations.CreateModel(
            name='OutboxMessage',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('task', models.CharField(max_length=100, verbose_name='task')),
                ('args', models.JSONField(default=list, verbose_name='arguments')),
                ('options', models.JSONField(default=dict, verbose_name='options')),
                ('created_at', models.DateTimeField(auto_now_add=True, verbose_name='created')),
                ('next_attempt_at', models.DateTimeField(db_index=True, verbose_name='next attempt')),
                ('attempts', models.PositiveIntegerField(default=0, verbose_name='failed attempts')),
                ('last_error', models.CharField(blank=True, max_length=255, verbose_name='last error')),
            ],
            options={
                'verbose_name': 'outbox message',
                'verbose_name_plural': 'outbox messages',
                'ordering': ['id'],
                'default_permissions': ('view',),
            },
        ),
        migrations.RemoveField(
            model_name='rotationrun',
            name='partitions_outstanding',
        ),
        migrations.AddField(
            model_name='rotationrun',
            name='next_attempt_at',
            field=models.DateTimeField(blank=True, help_text='While paused: when the retrying task tries again (the sweep leaves the run alone until then).', null=True, verbose_name='next attempt'),
        ),
        migrations.CreateModel(
            name='RewrapPartition',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('lo', models.BigIntegerField(verbose_name='first id')),
                ('hi', models.BigIntegerField(help_text='Exclusive.', verbose_name='end id')),
                ('cursor', models.BigIntegerField(help_text='Ids up to here were handled when the lease was last renewed.', verbose_name='done up to')),
                ('owner', models.CharField(blank=True, help_text='Empty: sent to workers, not yet taken.', max_length=200, verbose_name='leased by')),
                ('lease_expires_at', models.DateTimeField(blank=True, null=True, verbose_name='lease expires')),
                ('takeovers', models.PositiveIntegerField(default=0, help_text='Times an expired lease was taken over.', verbose_name='taken over')),
                ('created_at', models.DateTimeField(auto_now_add=True, verbose_name='created')),
                ('done_at', models.DateTimeField(blank=True, null=True, verbose_name='done')),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='partitions', to='rotation.rotationrun')),
            ],
            options={
                'verbose_name': 'rewrap partition',
                'verbose_name_plural': 'rewrap partitions',
                'ordering': ['run_id', 'lo'],
                'default_permissions': ('view',),
                'indexes': [models.Index(fields=['done_at', 'lease_expires_at'], name='rewrappartition_open')],
            },
        ),
    ]
