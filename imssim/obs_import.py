"""The simulator's import from OBS: `POST /v2/cloudimages/action` starts a job that reads the
object `bucket:key` from the S3-compatible store the simulator is pointed at (Simulator.set_obs),
makes an image of it, and `GET /v1/{project_id}/jobs/{job_id}` (or the newer
`GET /v1/cloudimages/job/{job_id}`) tells how the job is doing (INIT, RUNNING, SUCCESS, FAIL).

The object is read by one streaming GET in 1 MiB reads, hashed as it is written to the image's
file. Fault switches: `fail_imports` (that many jobs FAIL with `import_fail_reason`).
boto3 is imported only here and only when a job runs: the rest of the simulator stays stdlib.
"""
from __future__ import annotations

import hashlib
import threading
import uuid

READ_SIZE = 1024 * 1024
# IMS takes the format from the object's extension, and imports every format of its upload page
# as it is (converting it itself), not only the four its native upload takes.
EXTENSION_FORMATS = {"img": "raw", "raw": "raw", "qcow2": "qcow2", "vhd": "vhd", "zvhd2": "zvhd2",
                     "vmdk": "vmdk", "vhdx": "vhdx", "qcow": "qcow", "vdi": "vdi", "qed": "qed", "zvhd": "zvhd"}
NO_ACCESS = ("Failed to access OBS: the user has not authorized IMS to access OBS, or the bucket is "
             "not in the same region.")


def job_body(job: dict) -> dict:
    return {key: value for key, value in job.items() if key != "owner"}


def validate(body, ims_error, malformed) -> tuple[str, str, str, dict]:
    """(bucket, key, disk format, image fields) of a valid request body."""
    if not isinstance(body, dict):
        raise malformed("the body must be a JSON object")
    url = body.get("image_url")
    if not isinstance(url, str) or ":" not in url:
        raise ims_error(400, "IMS.0034", "image_url must be bucket:object.")
    bucket, key = url.split(":", 1)
    if "min_disk" not in body or not isinstance(body["min_disk"], int):
        raise ims_error(400, "IMS.0034", "min_disk is required.")
    extension = key.rsplit(".", 1)[-1].lower() if "." in key else ""
    disk_format = EXTENSION_FORMATS.get(extension)
    if disk_format is None:
        raise ims_error(400, "IMS.0072", "The image file format is not supported.")
    fields = {"name": body.get("name"), "disk_format": disk_format, "min_disk": body["min_disk"],
              "min_ram": body.get("min_ram", 0)}
    if body.get("os_version"):
        fields["__os_version"] = body["os_version"]
    tags = body.get("image_tags") or []
    fields["tags"] = [f"{t.get('key')}={t.get('value')}" if t.get("value") else str(t.get("key")) for t in tags]
    return bucket, key, disk_format, fields


def start_job(sim, account, bucket: str, key: str, fields: dict, now_stamp) -> dict:
    job = {"job_id": uuid.uuid4().hex, "job_type": "imsImportImageJob", "status": "INIT",
           "begin_time": now_stamp(), "end_time": "", "entities": {}, "error_code": None,
           "fail_reason": None, "owner": account.project_id}
    with sim._lock:
        sim._jobs[job["job_id"]] = job
    threading.Thread(target=_run, args=(sim, account, job, bucket, key, fields, now_stamp), daemon=True).start()
    return job


def _run(sim, account, job: dict, bucket: str, key: str, fields: dict, now_stamp) -> None:
    with sim._lock:
        job["status"] = "RUNNING"
    with sim._lock:
        failing = sim._faults.fail_imports > 0
        sim._faults.fail_imports -= failing
    try:
        if failing:
            raise _JobFailed("IMS.0193", sim.faults()["import_fail_reason"])
        image = sim.create_image(account, fields, disk_formats=set(EXTENSION_FORMATS.values()))
        size, md5, sha512 = _copy_object(sim, bucket, key, sim.image_path(image["id"]))
        with sim._lock:
            sim._images[image["id"]].fields.update(status="saving")
        sim.finish_upload(image["id"], size, md5, sha512)
    except _JobFailed as failed:
        _finish(sim, job, now_stamp, status="FAIL", error_code=failed.code, fail_reason=failed.reason)
        return
    except Exception as problem:  # the simulator's own trouble: the job fails as IMS's would
        _finish(sim, job, now_stamp, status="FAIL", error_code="IMS.0001", fail_reason=str(problem))
        return
    _finish(sim, job, now_stamp, status="SUCCESS", entities={"image_id": image["id"]})


def _finish(sim, job: dict, now_stamp, **changes) -> None:
    with sim._lock:
        job.update(changes, end_time=now_stamp())


class _JobFailed(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def _copy_object(sim, bucket: str, key: str, path) -> tuple[int, str, str]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if not sim.obs:
        raise _JobFailed("IMS.0193", NO_ACCESS)
    client = boto3.client("s3", endpoint_url=sim.obs["endpoint_url"], region_name=sim.obs.get("region"),
                          aws_access_key_id=sim.obs["access_key"], aws_secret_access_key=sim.obs["secret_key"],
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                        response_checksum_validation="when_required"))
    md5, sha512, size = hashlib.md5(usedforsecurity=False), hashlib.sha512(), 0
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with open(path, "wb") as out:
            while data := body.read(READ_SIZE):
                out.write(data)
                md5.update(data)
                sha512.update(data)
                size += len(data)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "403"):
            raise _JobFailed("IMS.0193", NO_ACCESS) from None
        raise _JobFailed("IMS.0194", f"The file was not found in OBS ({code}).") from None
    except BotoCoreError as exc:
        raise _JobFailed("IMS.0193", f"OBS could not be reached ({type(exc).__name__}).") from None
    return size, md5.hexdigest(), sha512.hexdigest()
