"""Session fixture: real Keystone 30 + Glance 33 on loopback (see tools/openstack_peers.py).

Usage: `from tests.openstack_fixture import openstack_peers  # noqa: F401` in a test module or
conftest.py, then take `openstack_peers` (a tools.openstack_peers.Peers) as an argument.
The first run installs both venvs under ~/.cache/ims-portal/openstack (about 70 s); afterwards
start-up is about 10 s per test session. Tests are skipped, not failed, when the peers cannot be
installed or started.
"""
from __future__ import annotations

import pytest

from tools.openstack_peers import PeersUnavailable, install, start


@pytest.fixture(scope="session")
def openstack_peers(tmp_path_factory):
    try:
        install()
        peers = start(tmp_path_factory.mktemp("openstack-peers"))
    except PeersUnavailable as exc:
        pytest.skip(f"real OpenStack peers unavailable: {exc.reason}")
    try:
        yield peers
    finally:
        peers.stop()
