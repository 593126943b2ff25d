# The rotation engine's per-provider rate limit: cap (live, audited) and its shared token-bucket state (issue 14).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('rotation', '0005_kek_schedules_to_policies'),
    ]

    operations = [
        migrations.CreateModel(
            name='ProviderRateLimit',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('provider', models.CharField(help_text='Provider name, as in HMD_KMS_PROVIDER (aws, gcp, vault …).', max_length=64, unique=True, verbose_name='provider')),
                ('cap', models.PositiveIntegerField(blank=True, help_text='Provider calls per second rotations may make, all workers together. Empty: the HMD_ROTATION_RATE_LIMITS default; 0: no cap.', null=True, verbose_name='cap (calls/s)')),
                ('factor', models.FloatField(default=1.0, help_text='Below 1 after the provider throttled rotation traffic; it grows back gradually.', verbose_name='share of the cap allowed')),
                ('factor_since', models.FloatField(default=0.0, verbose_name='factor set at (epoch s)')),
                ('base_rate', models.FloatField(blank=True, help_text='For a provider without a cap: the rate measured when it first throttled (what the factor scales).', null=True, verbose_name='base rate')),
                ('next_free_at', models.FloatField(default=0.0, verbose_name='next free slot (epoch s)')),
                ('blocked_until', models.FloatField(default=0.0, verbose_name='paused until (epoch s)')),
                ('throttles', models.PositiveIntegerField(default=0, verbose_name='throttling errors')),
                ('last_throttled_at', models.FloatField(default=0.0, verbose_name='last throttled (epoch s)')),
                ('window_started', models.FloatField(default=0.0, verbose_name='window started (epoch s)')),
                ('window_calls', models.FloatField(default=0.0, verbose_name='calls in the window')),
                ('measured_rate', models.FloatField(blank=True, null=True, verbose_name='measured calls/s')),
                ('updated_at', models.DateTimeField(auto_now=True, verbose_name='updated')),
            ],
            options={
                'verbose_name': 'provider rate limit',
                'verbose_name_plural': 'provider rate limits',
                'ordering': ['provider'],
                'default_permissions': ('add', 'view', 'change'),
            },
        ),
    ]
