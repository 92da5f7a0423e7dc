"""`manage.py check --deploy` tries object staging's bucket with the configured keys, so that a
wrong key or bucket shows at start-up rather than at the first upload."""

from django.core.checks import Error, register

from uploads.staging import s3
from uploads.staging.errors import StagingUnavailable


@register(deploy=True)
def check_object_storage(app_configs, **kwargs):
    from django.core.files.storage import storages

    if not s3.is_s3(storages["staging"]):
        return []
    try:
        with s3.s3_errors("the staging bucket"):
            s3.client().head_bucket(Bucket=s3.bucket())
    except FileNotFoundError:
        return [Error(f"The staging bucket {s3.bucket()!r} does not exist.",
                      hint="Create it, or fix STAGING_S3_BUCKET.", id="uploads.E010")]
    except StagingUnavailable as exc:
        return [Error(exc.for_admin or "The object storage for staging cannot be reached.",
                      hint="Check STAGING_S3_ENDPOINT_URL, the network, and the keys.", id="uploads.E011")]
    return []
