"""Workers shared fairly: how many pushes may run at once, and which waiting upload goes next.

At most PUSH_CONCURRENCY_PER_USER pushes run at once for one person, and at most
PUSH_CONCURRENCY_PER_PROJECT for one cloud project (CloudAccount.project_id), however many
workers there are. A slot is not a counter that a dead worker could leak: it is a row, an
upload in CHECKING, CONVERTING or PUSHING whose heartbeat is fresh. A push whose worker died
stops holding its slot once its heartbeat is PUSH_STALE_SECONDS old.

An upload over a cap stays RECEIVED ("waiting") and its message is dropped: nothing retries in a
loop. It is queued again when a slot frees, by the push that ends (`services.push._hand_off`) or, as
a backstop, by beat's reconciler, which only re-queues waiting uploads that have a free slot.

Among uploads that could start, a person with fewer pushes running goes first: a push message of
someone who already has pushes running gives way to the waiting upload of someone with fewer
(and queues it), so that one person's twenty uploads queued earlier do not hold every worker.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.translation import gettext, ngettext

from uploads.models import WORKING, CloudAccount, Status, Upload

# How many waiting uploads are looked at to pick the next ones: plenty for a page of people.
LOOK_AHEAD = 500


def holding_a_slot() -> Q:
    """Uploads a live worker is busy with."""
    fresh = timezone.now() - timedelta(seconds=settings.PUSH_STALE_SECONDS)
    return Q(status__in=WORKING, heartbeat_at__gte=fresh)


def waiting() -> Q:
    """Received uploads that may start as soon as there is a slot (not those in a retry's backoff)."""
    return Q(status=Status.RECEIVED) & (Q(retry_at__isnull=True) | Q(retry_at__lte=timezone.now()))


@dataclass
class Load:
    """Pushes running now, per person and per cloud project."""

    by_owner: Counter = field(default_factory=Counter)
    by_project: Counter = field(default_factory=Counter)

    def has_room(self, owner_id: int, project: str) -> bool:
        if self.by_owner[owner_id] >= settings.PUSH_CONCURRENCY_PER_USER:
            return False
        return not project or self.by_project[project] < settings.PUSH_CONCURRENCY_PER_PROJECT

    def add(self, owner_id: int, project: str) -> None:
        self.by_owner[owner_id] += 1
        if project:
            self.by_project[project] += 1


def current_load() -> Load:
    load = Load()
    for owner_id, project in Upload.objects.filter(holding_a_slot()).values_list(
        "owner_id", "owner__cloud_account__project_id"
    ):
        load.add(owner_id, project or "")
    return load


def project_of(owner_id: int) -> str:
    """The cloud project a person's pushes go to ("" without a cloud account: no project cap)."""
    return CloudAccount.objects.filter(user_id=owner_id).values_list("project_id", flat=True).first() or ""


def _lock_slots(owner_id: int, project: str) -> None:
    """Lock the rows that stand for the person's and the project's slots until the claim commits,
    so that two workers claiming the last slot at the same moment are counted one after the
    other (PostgreSQL; SQLite runs one writing transaction at a time anyway). Always the user
    row first, then the project's accounts in id order: two claims never wait on each other in
    a circle."""
    list(get_user_model().objects.select_for_update().filter(pk=owner_id).values_list("pk"))
    if project:
        list(CloudAccount.objects.select_for_update().filter(project_id=project).order_by("pk").values_list("pk"))


@dataclass
class Turn:
    may_start: bool
    # A waiting upload that goes before this one: the caller queues it.
    goes_first: int | None = None


def take_turn(upload: Upload) -> Turn:
    """Whether `upload` may be claimed now. Call it inside the claim's transaction: it locks the
    slots of the owner and the cloud project until the claim commits."""
    project = project_of(upload.owner_id)
    _lock_slots(upload.owner_id, project)
    load = current_load()
    if not load.has_room(upload.owner_id, project):
        return Turn(may_start=False)
    first = _fairer_waiting(upload, load)
    return Turn(may_start=first is None, goes_first=first)


def _fairer_waiting(upload: Upload, load: Load) -> int | None:
    """The waiting upload of another person with fewer pushes running than this one's owner,
    that could start now (fewest running, then oldest), or None."""
    mine = load.by_owner[upload.owner_id]
    if mine == 0:
        return None  # nobody has fewer than none
    others = _waiting_rows(Upload.objects.exclude(owner_id=upload.owner_id), load)
    candidates = [
        (load.by_owner[owner_id], created_at, pk)
        for pk, owner_id, project, created_at in others
        if load.by_owner[owner_id] < mine and load.has_room(owner_id, project or "")
    ]
    return min(candidates)[2] if candidates else None


def _waiting_rows(uploads: QuerySet, load: Load) -> list[tuple]:
    """(pk, owner id, project, created) of the waiting ones among `uploads`, oldest first, leaving
    out people and projects without a free slot (so that a thousand uploads of one person waiting
    for their own slots do not hide another person's)."""
    full_owners = [o for o, n in load.by_owner.items() if n >= settings.PUSH_CONCURRENCY_PER_USER]
    full_projects = [p for p, n in load.by_project.items() if n >= settings.PUSH_CONCURRENCY_PER_PROJECT]
    return list(
        uploads.filter(waiting())
        .exclude(owner_id__in=full_owners)
        .exclude(owner__cloud_account__project_id__in=full_projects)
        .order_by("created_at", "pk")
        .values_list("pk", "owner_id", "owner__cloud_account__project_id", "created_at")[:LOOK_AHEAD]
    )


def startable(uploads: QuerySet) -> list[int]:
    """Of these uploads, the waiting ones that have a slot now, in the order they should start
    (people with fewer pushes running first, then the oldest), no more than the free slots."""
    load = current_load()
    chosen = []
    rows = sorted(_waiting_rows(uploads, load), key=lambda row: (load.by_owner[row[1]], row[3], row[0]))
    for pk, owner_id, project, _ in rows:
        if load.has_room(owner_id, project or ""):
            load.add(owner_id, project or "")
            chosen.append(pk)
    return chosen


def next_after(upload: Upload) -> list[int]:
    """When a push of `upload` ended, its slot is free: the waiting uploads of the same person
    or the same cloud project that may take it."""
    project = project_of(upload.owner_id)
    same = Q(owner_id=upload.owner_id)
    if project:
        same |= Q(owner__cloud_account__project_id=project)
    return startable(Upload.objects.filter(same))


def worth_nudging(upload_ids: list[int]) -> list[int]:
    """For the reconciler: of these uploads, keep pushes whose worker died and the received ones
    that could start now; a waiting upload without a free slot is left for the hand-off."""
    received = set(Upload.objects.filter(pk__in=upload_ids, status=Status.RECEIVED).values_list("pk", flat=True))
    can_start = set(startable(Upload.objects.filter(pk__in=received)))
    return [pk for pk in upload_ids if pk not in received or pk in can_start]


def uploads_ahead(upload: Upload) -> int | None:
    """How many uploads go before this waiting one, or None when it does not wait for a slot.

    Ahead of it: the owner's own waiting uploads created before it and, while the cloud project
    has every slot taken, the waiting uploads of others in that project created before it.
    """
    if upload.status != Status.RECEIVED or (upload.retry_at and upload.retry_at > timezone.now()):
        return None
    project = project_of(upload.owner_id)
    load = current_load()
    if load.has_room(upload.owner_id, project):
        return None  # about to start: its message is on its way
    earlier = Q(created_at__lt=upload.created_at) | Q(created_at=upload.created_at, pk__lt=upload.pk)
    same = Q(owner_id=upload.owner_id)
    if project and load.by_project[project] >= settings.PUSH_CONCURRENCY_PER_PROJECT:
        same |= Q(owner__cloud_account__project_id=project)
    return Upload.objects.filter(waiting(), earlier, same).count()


def waiting_text(upload: Upload) -> str:
    """What the person reads while the upload waits for a slot ("" when it does not wait)."""
    ahead = uploads_ahead(upload)
    if ahead is None:
        return ""
    if ahead == 0:
        return gettext("Waiting to send: yours is next")
    return ngettext("Waiting to send: %(count)d upload ahead of yours", "Waiting to send: %(count)d uploads ahead of yours",
                    ahead) % {"count": ahead}
