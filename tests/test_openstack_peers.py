"""End-to-end checks of the real Keystone + Glance peers (tools/openstack_peers.py).

Run: python -m pytest tests/test_openstack_peers.py -p no:django -m openstack
"""
from __future__ import annotations

import hashlib
import os

import pytest
import requests

from tests.openstack_fixture import openstack_peers  # noqa: F401
from tools.openstack_peers import get_token

JSON = {"Accept": "application/json"}


def _token(peers, user):
    password, project, _role = peers.users[user]
    token, _expires_at = get_token(peers.keystone_url, user, password, project)
    return token


def _create_image(peers, token, name="e2e-raw"):
    reply = requests.post(
        f"{peers.glance_url}/v2/images",
        json={"name": name, "disk_format": "raw", "container_format": "bare",
              "visibility": "private"},
        headers={**JSON, "X-Auth-Token": token}, timeout=30)
    assert reply.status_code == 201, reply.text
    image = reply.json()
    assert image["status"] == "queued"
    return image


@pytest.mark.openstack
def test_keystone_issues_demo_token(openstack_peers):  # noqa: F811
    body = {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "demo", "domain": {"id": "default"}, "password": "demopw"}}},
        "scope": {"project": {"name": "demo", "domain": {"id": "default"}}},
    }}
    reply = requests.post(f"{openstack_peers.keystone_url}/auth/tokens", json=body, timeout=30)
    assert reply.status_code == 201, reply.text
    assert reply.headers["X-Subject-Token"]
    token = reply.json()["token"]
    assert token["project"]["name"] == "demo"
    assert "member" in {role["name"] for role in token["roles"]}
    assert token["project"]["id"] == openstack_peers.project_ids["demo"]


@pytest.mark.openstack
def test_upload_raw_image_becomes_active_with_checksums(openstack_peers, tmp_path):  # noqa: F811
    token = _token(openstack_peers, "demo")
    image = _create_image(openstack_peers, token)
    assert image["owner"] == openstack_peers.project_ids["demo"]

    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    with open(path, "rb") as body:  # requests streams a file object with Content-Length
        reply = requests.put(
            f"{openstack_peers.glance_url}/v2/images/{image['id']}/file", data=body,
            headers={**JSON, "X-Auth-Token": token,
                     "Content-Type": "application/octet-stream"}, timeout=120)
    assert reply.status_code == 204, reply.text

    reply = requests.get(f"{openstack_peers.glance_url}/v2/images/{image['id']}",
                         headers={**JSON, "X-Auth-Token": token}, timeout=30)
    assert reply.status_code == 200, reply.text
    stored = reply.json()
    assert stored["status"] == "active"
    assert stored["size"] == len(data)
    assert stored["checksum"] == hashlib.md5(data).hexdigest()
    assert stored["os_hash_algo"] == "sha512"
    assert stored["os_hash_value"] == hashlib.sha512(data).hexdigest()


@pytest.mark.openstack
def test_other_tenant_gets_404_on_demo_image(openstack_peers):  # noqa: F811
    image = _create_image(openstack_peers, _token(openstack_peers, "demo"), name="e2e-private")
    reply = requests.get(f"{openstack_peers.glance_url}/v2/images/{image['id']}",
                         headers={**JSON, "X-Auth-Token": _token(openstack_peers, "alt")},
                         timeout=30)
    assert reply.status_code == 404, reply.text


@pytest.mark.openstack
def test_invalid_token_gets_401(openstack_peers):  # noqa: F811
    reply = requests.get(f"{openstack_peers.glance_url}/v2/images",
                         headers={**JSON, "X-Auth-Token": "not-a-real-token"}, timeout=30)
    assert reply.status_code == 401, reply.text
    assert reply.headers["WWW-Authenticate"].startswith("Keystone uri=")
