"""A status of its own for files the check refused: they were "failed", with a Retry that could
only be refused the same way. Uploads the check refused before this status existed move to it."""

from django.db import migrations, models


def failed_by_the_check_to_refused(apps, schema_editor):
    Upload = apps.get_model("uploads", "Upload")
    UploadEvent = apps.get_model("uploads", "UploadEvent")
    for upload in Upload.objects.filter(status="failed").only("pk", "inspection", "error_code").iterator():
        problem = (upload.inspection or {}).get("problem") or {}
        if not problem.get("code") or problem.get("code") != upload.error_code:
            continue  # failed for another reason (IMS, a timeout, an expired upload): Retry stays
        if Upload.objects.filter(pk=upload.pk, status="failed").update(status="refused"):
            UploadEvent.objects.create(upload_id=upload.pk, from_status="failed", to_status="refused",
                                       message="The check had refused this file: marked as refused")


def refused_to_failed(apps, schema_editor):
    apps.get_model("uploads", "Upload").objects.filter(status="refused").update(status="failed")


class Migration(migrations.Migration):

    dependencies = [
        ("uploads", "0006_staged_sha512"),
    ]

    operations = [
        migrations.AlterField(
            model_name="upload",
            name="status",
            field=models.CharField(
                choices=[
                    ("receiving", "Receiving"), ("received", "Received"), ("checking", "Checking the file"),
                    ("converting", "Converting"), ("pushing", "Sending to IMS"), ("processing", "IMS processing"),
                    ("ready", "Ready"), ("failed", "Failed"), ("refused", "Refused"),
                    ("reconnect", "Reconnect needed"), ("cancelled", "Cancelled"),
                ],
                default="receiving",
                max_length=16,
            ),
        ),
        migrations.RunPython(failed_by_the_check_to_refused, refused_to_failed),
    ]
