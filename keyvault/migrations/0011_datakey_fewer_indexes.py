# DataKey keeps only the indexes its queries use: every index costs a write per row a rotation
# rewraps. The kek_id index goes (datakey_kek_version_id starts with kek_id); owner_ref keeps a plain
# btree for its exact lookups, without the LIKE pattern index db_index adds on PostgreSQL (issue 14).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('keyvault', '0010_kek_schedule_on_policy'),
    ]

    operations = [
        migrations.AlterField(
            model_name='datakey',
            name='kek',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='data_keys', to='keyvault.keyencryptionkey', verbose_name='key-encryption key'),
        ),
        migrations.AlterField(
            model_name='datakey',
            name='owner_ref',
            field=models.CharField(blank=True, help_text='Who uses the key, e.g. app.model.field or an external id.', max_length=255, verbose_name='owner'),
        ),
        migrations.AddIndex(
            model_name='datakey',
            index=models.Index(fields=['owner_ref'], name='datakey_owner_ref'),
        ),
    ]
