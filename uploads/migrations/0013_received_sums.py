from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('uploads', '0012_review_admin'),
    ]

    operations = [
        migrations.AddField(
            model_name='upload',
            name='received_sums',
            field=models.JSONField(blank=True, default=dict, editable=False),
        ),
    ]
