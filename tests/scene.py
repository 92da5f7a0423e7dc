"""A realistic portal to look at: people, their cloud accounts and uploads in every state a person
meets, made by the real services against the IMS simulator (no worker: the pushes run in the
test's thread, and `task_queue` catches what the services would queue).

The browser tests that check every page (tests/test_browser_pages.py) and take the README's
screenshots walk through it. The files are real disk images made by qemu-img, of a few MiB, with
disks of many GiB inside.
"""

import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth.models import Permission

from tests.conftest import connect_cloud, make_image
from uploads import review, services
from uploads.models import Status, Upload

MiB = 1024 * 1024


def qcow2_image(path: Path, *, virtual: str = "20G", data_mib: int = 8) -> Path:
    """A qcow2 file with a disk of `virtual` inside, `data_mib` of it written."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {data_mib}M", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def received(owner, path: Path, *, name: str, disk_format: str, **details) -> Upload:
    """`path` uploaded in one chunk, as the tus server does it."""
    size = path.stat().st_size
    upload = services.upload_create(owner=owner, size=size, filename=path.name, name=name,
                                    disk_format=disk_format, **details)
    with path.open("rb") as stream:
        services.upload_receive(upload=upload, offset=0, stream=stream, length=size)
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED, upload.status
    return upload


def pushed(upload: Upload) -> Upload:
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


@dataclass
class Scene:
    alice: object  # uploads in every state
    bob: object  # connected, nothing uploaded yet
    carol: object  # a reviewer
    dave: object  # not connected to the cloud
    uploads: dict = field(default_factory=dict)  # what -> Upload


def make_scene(django_user_model, sim, settings, folder: Path) -> Scene:
    users = {name: django_user_model.objects.create_user(name, f"{name}@example.com", f"{name}-pw-1234")
             for name in ("alice", "bob", "carol", "dave", "erik")}
    for name, full in [("alice", "Alice Wagner"), ("carol", "Carol Schmidt"), ("erik", "Erik Lund")]:
        users[name].first_name, users[name].last_name = full.split()
        users[name].save()
    users["carol"].user_permissions.add(Permission.objects.get(codename="review_upload"))
    for name in ("alice", "bob", "carol", "erik"):
        connect_cloud(users[name])
    erik = users.pop("erik")  # only in the review queue
    scene = Scene(**users)
    alice, carol = users["alice"], users["carol"]
    up = scene.uploads
    details = {"os_version": "Ubuntu 24.04 server 64bit", "min_disk": 20, "min_ram": 2048}

    # Oldest first: My uploads lists the newest first.
    up["failed"] = received(alice, qcow2_image(folder / "windows-server-2022.qcow2", virtual="40G", data_mib=12),
                            name="windows-server-2022", disk_format="qcow2",
                            os_version="Windows Server 2022 Standard 64bit", min_disk=40, min_ram=4096)
    sim.set_faults(processing_seconds=600)
    pushed(up["failed"])
    sim.set_image_status(up["failed"].ims_image_id, "killed")
    services.upload_poll(upload_id=up["failed"].pk)

    up["ready"] = pushed(received(alice, qcow2_image(folder / "ubuntu-24.04-server.qcow2", data_mib=24),
                                  name="ubuntu-24.04-server", disk_format="qcow2", tags=["team=web", "env=prod"],
                                  **details))
    sim.set_image_status(up["ready"].ims_image_id, "active")
    services.upload_poll(upload_id=up["ready"].pk)

    up["refused"] = received(alice, make_image(folder / "legacy-app-backup.qcow2", 6 * MiB),
                             name="legacy-app-backup", disk_format="qcow2")
    pushed(up["refused"])  # raw bytes said to be qcow2: the check refuses it

    up["processing"] = pushed(received(alice, qcow2_image(folder / "gitlab-runner.qcow2", data_mib=16),
                                       name="gitlab-runner", disk_format="qcow2", **details))

    settings.UPLOAD_REVIEW_REQUIRED = True
    up["rejected"] = pushed(received(alice, qcow2_image(folder / "reporting-db.qcow2", virtual="80G", data_mib=10),
                                     name="reporting-db", disk_format="qcow2", min_disk=80, min_ram=8192))
    review.upload_reject(upload=up["rejected"], by=carol,
                         reason="Install cloud-init first, please: servers made from it cannot get their SSH keys.")
    up["eriks"] = pushed(received(erik, qcow2_image(folder / "postgres-16-appliance.qcow2", virtual="50G", data_mib=14),
                                  name="postgres-16-appliance", disk_format="qcow2", min_disk=50, min_ram=4096))
    up["carols"] = pushed(received(carol, qcow2_image(folder / "monitoring-agent.qcow2", virtual="10G", data_mib=6),
                                   name="monitoring-agent", disk_format="qcow2"))
    up["awaiting"] = pushed(received(alice, qcow2_image(folder / "web-frontend-v3.qcow2", data_mib=20),
                                     name="web-frontend-v3", disk_format="qcow2", tags=["team=web"], **details))
    settings.UPLOAD_REVIEW_REQUIRED = False
    sim.set_faults(processing_seconds=0)

    # The browser is still sending this one: 38 MiB of 96 MiB so far.
    up["receiving"] = services.upload_create(owner=alice, size=96 * MiB, filename="debian-12-genericcloud.raw",
                                             name="debian-12-genericcloud", disk_format="raw", **details)
    part = bytes(512) + bytes(38 * MiB - 512)
    services.upload_receive(upload=up["receiving"], offset=0, stream=io.BytesIO(part), length=len(part))

    for upload in up.values():
        upload.refresh_from_db()
    expected = {"failed": Status.FAILED, "ready": Status.READY, "refused": Status.REFUSED,
                "processing": Status.PROCESSING, "rejected": Status.REJECTED, "carols": Status.AWAITING_REVIEW,
                "awaiting": Status.AWAITING_REVIEW, "eriks": Status.AWAITING_REVIEW, "receiving": Status.RECEIVING}
    assert {k: u.status for k, u in up.items()} == expected
    return scene
