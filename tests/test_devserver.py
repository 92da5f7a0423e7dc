"""`make run` (tools/devserver.py): a child that dies is started again; Ctrl-C still stops all."""

import sys
import threading

import pytest

from tests.conftest import wait_for
from tools import devserver

# Prints its ready line, lives a moment, then dies with status 3.
SHORT_LIVED = [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(0.3); sys.exit(3)"]
LONG_LIVED = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]


class Watched:
    """A Devserver whose watch() runs in a thread, as main() runs it after start-up."""

    def __init__(self):
        self.server = devserver.Devserver()
        self.outcome: list[int] = []
        self.thread = threading.Thread(target=lambda: self.outcome.append(self.server.watch()), daemon=True)

    def stop(self) -> None:
        self.server.stopping.set()  # what the SIGINT/SIGTERM handler does
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.server.stop_all()


@pytest.fixture
def watched(monkeypatch):
    """Restarts come after 0.2, 0.4, 0.8, 0.8 ... s, so that the tests are quick."""
    monkeypatch.setattr(devserver, "RESTART_FIRST_PAUSE", 0.2)
    monkeypatch.setattr(devserver, "RESTART_LONGEST_PAUSE", 0.8)
    watched = Watched()
    yield watched
    watched.stop()


def test_a_child_that_dies_is_started_again_after_a_growing_pause_and_the_rest_go_on(watched, capsys):
    server = watched.server
    calm = server.start("calm", LONG_LIVED, ready_line="up")
    flaky = server.start("flaky", SHORT_LIVED, ready_line="up")
    calm_pid = calm.process.pid
    watched.thread.start()

    wait_for(lambda: flaky.starts >= 4, timeout=20, what="the flaky child to be started for the fourth time")
    out = capsys.readouterr().out
    assert "flaky exited with status 3: starting it again in 0.2 s" in out
    assert "flaky exited with status 3: starting it again in 0.4 s" in out
    assert "flaky exited with status 3: starting it again in 0.8 s" in out
    assert out.count("starting flaky again:") >= 3
    assert out.count("[flaky]") >= 3  # its output is shown each time
    assert calm.process.poll() is None and calm.process.pid == calm_pid  # nobody else was touched
    assert watched.outcome == []  # still watching


def test_a_child_that_ran_for_a_while_is_started_again_after_the_first_pause(watched, monkeypatch, capsys):
    monkeypatch.setattr(devserver, "RESTART_STABLE", 0.1)  # the short-lived child counts as stable
    flaky = watched.server.start("flaky", SHORT_LIVED, ready_line="up")
    watched.thread.start()
    wait_for(lambda: flaky.starts >= 4, timeout=20, what="three restarts")
    out = capsys.readouterr().out
    assert out.count("starting it again in 0.2 s") >= 3 and "starting it again in 0.4 s" not in out


def test_ctrl_c_stops_every_child_and_exits_0(watched):
    server = watched.server
    calm = server.start("calm", LONG_LIVED, ready_line="up")
    flaky = server.start("flaky", SHORT_LIVED, ready_line="up")
    watched.thread.start()
    wait_for(lambda: flaky.restart_at is not None, timeout=10, what="the flaky child to die")

    watched.stop()
    assert watched.outcome == [0]
    assert calm.process.poll() is not None
    assert flaky.process.poll() is not None and flaky.restart_at is not None  # not started again
