# Object staging (uploads/staging/s3.py) and IMS's import from OBS (uploads/obs_import.py).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('uploads', '0007_refused'),
    ]

    operations = [
        migrations.CreateModel(
            name='StagedMultipart',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=255, unique=True)),
                ('size', models.BigIntegerField()),
                ('multipart_id', models.CharField(max_length=1024)),
                ('parts', models.JSONField(default=list)),
                ('pending_key', models.CharField(blank=True, max_length=1024)),
                ('pending_size', models.BigIntegerField(default=0)),
                ('generation', models.PositiveIntegerField(default=0)),
                ('active_at', models.DateTimeField(blank=True, null=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
        ),
        migrations.AddField(
            model_name='upload',
            name='ims_job_id',
            field=models.CharField(blank=True, max_length=64),
        ),
    ]
