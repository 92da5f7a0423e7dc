"""The upload state machine: which moves exist, and that only the services make them."""

import pytest

from uploads import services
from uploads.models import (
    ALLOWED_MOVES,
    CANCELLABLE,
    FINISHED,
    WAITING_FOR_A_PERSON,
    WAITING_ON,
    Status,
    Upload,
    UploadEvent,
    can_move,
)


def test_every_status_has_a_row_in_the_move_table():
    assert set(ALLOWED_MOVES) == set(Status.values)


def test_moves_lead_only_to_known_statuses():
    for targets in ALLOWED_MOVES.values():
        assert targets <= set(Status.values)


def test_finished_uploads_never_move_again():
    for status in FINISHED:
        assert ALLOWED_MOVES[status] == set()


def test_every_unfinished_status_says_who_moves_it_on():
    assert set(WAITING_ON) == set(Status.values) - FINISHED
    assert {s for s, who in WAITING_ON.items() if who == "person"} == WAITING_FOR_A_PERSON


def test_the_happy_path_is_allowed():
    path = [Status.RECEIVING, Status.RECEIVED, Status.CHECKING, Status.PUSHING, Status.PROCESSING, Status.READY]
    for old, new in zip(path, path[1:]):
        assert can_move(old, new)


def test_converting_sits_between_checking_and_pushing():
    assert can_move(Status.CHECKING, Status.CONVERTING) and can_move(Status.CONVERTING, Status.PUSHING)


def test_no_skipping_ahead():
    assert not can_move(Status.RECEIVING, Status.PUSHING)
    assert not can_move(Status.RECEIVED, Status.PUSHING)  # never sent unchecked
    assert not can_move(Status.RECEIVED, Status.READY)
    assert not can_move(Status.READY, Status.RECEIVED)
    assert not can_move(Status.CANCELLED, Status.RECEIVED)


def test_every_unfinished_upload_can_be_cancelled():
    assert CANCELLABLE == set(Status.values) - FINISHED


@pytest.fixture
def upload(alice):
    return Upload.objects.create(
        owner=alice, name="n", filename="n.qcow2", disk_format="qcow2", size=10, staged_name="x.img"
    )


def test_a_move_is_written_to_the_timeline(upload):
    assert services.state.move(upload, Status.CANCELLED, "Cancelled by test")
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert upload.finished_at is not None
    event = UploadEvent.objects.get(upload=upload)
    assert (event.from_status, event.to_status, event.message) == ("receiving", "cancelled", "Cancelled by test")


def test_a_move_that_is_not_allowed_changes_nothing(upload):
    assert not services.state.move(upload, Status.READY, "nope")
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVING
    assert not UploadEvent.objects.exists()


def test_a_stale_copy_cannot_move_a_row_that_moved_meanwhile(upload):
    stale = Upload.objects.get(pk=upload.pk)
    assert services.state.move(upload, Status.CANCELLED, "first")
    # The stale copy still believes it is receiving; the guarded update finds no such row.
    assert not services.state.move(stale, Status.RECEIVED, "second")
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert UploadEvent.objects.count() == 1
