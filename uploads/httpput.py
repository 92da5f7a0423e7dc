"""One HTTP PUT of a sealed file over plain HTTP, the body sent by the kernel (sendfile).

requests (urllib3) copies every buffer of a body through Python and sends it with sendall();
for a file whose sums are already known (filebody.SealedBody) that copy is the push's whole
CPU cost. This module sends the request line and headers with http.client, the body with
`SealedBody.send_to()` (os.sendfile in large slices), and reads the reply with http.client
again; the reply comes back as a requests.Response, so uploads/ims.py explains it as any other.

Only for `http://` URLs that requests would send directly (no proxy from the environment, the
session's stock adapter): uploads/ims.py decides (`applies`) and uses requests for the rest
(TLS, proxies), as before. No Django here.
"""

import http.client
import socket
import struct
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from uploads.filebody import SealedBody

# How long a reply that came early (the server refused the body half-way) is waited for.
EARLY_REPLY_SECONDS = 5
# Headers requests would add that the PUT needs as well.
USER_AGENT = requests.utils.default_user_agent()


def applies(session: requests.Session, url: str) -> bool:
    """Plain http, no proxy, and the session's own transport: the sendfile PUT may be used."""
    if urlsplit(url).scheme != "http":
        return False
    if type(session.get_adapter(url)) is not HTTPAdapter:  # a test's or a tool's own transport
        return False
    proxies = dict(session.proxies)
    if session.trust_env:
        proxies.update(requests.utils.get_environ_proxies(url))
    return not (proxies.get("http") or proxies.get("all"))


class EarlyReply(Exception):
    """Internal: the server answered before the whole body was sent."""


def put(url: str, headers: dict, body: SealedBody, *, connect_timeout: float, read_timeout: float
        ) -> requests.Response:
    """PUT `body` (Content-Length: len(body)) to `url`; the reply as a requests.Response.

    Raises requests.ConnectionError / requests.Timeout (as requests would) when the connection
    fails; whatever the body raises (filebody.Aborted, a failed seal) after closing the
    connection, so the server never sees a whole body.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=connect_timeout)
    try:
        try:
            connection.connect()
            sock = connection.sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocking, with kernel timeouts: one sendfile() moves a whole slice (GIL released),
            # and fails with EAGAIN only after `read_timeout` without progress (as requests'
            # read timeout bounds each send there).
            sock.settimeout(None)
            _set_timeout(sock, socket.SO_SNDTIMEO, read_timeout)
            _set_timeout(sock, socket.SO_RCVTIMEO, read_timeout)
            connection.putrequest("PUT", parts.path + (f"?{parts.query}" if parts.query else ""),
                                  skip_accept_encoding=True)
            for name, value in {"User-Agent": USER_AGENT, **headers, "Content-Length": str(len(body))}.items():
                connection.putheader(name, value)
            connection.endheaders()
            try:
                body.send_to(sock)
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered and closed (a 401, 413 ...): that answer is the news.
                raise EarlyReply() from None
            return _reply(connection, url)
        except EarlyReply:
            sock.settimeout(EARLY_REPLY_SECONDS)
            try:
                return _reply(connection, url)
            except (OSError, http.client.HTTPException) as exc:
                raise requests.ConnectionError(f"the connection broke while sending: {exc}") from None
        except BlockingIOError:  # SO_SNDTIMEO / SO_RCVTIMEO ran out
            raise requests.Timeout("the image service took no bytes, or did not answer, for too long") from None
        except (OSError, http.client.HTTPException) as exc:
            raise requests.ConnectionError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _reply(connection: http.client.HTTPConnection, url: str) -> requests.Response:
    reply = connection.getresponse()
    response = requests.Response()
    response.status_code = reply.status
    response.reason = reply.reason
    response.headers = CaseInsensitiveDict(reply.getheaders())
    response._content = reply.read()
    response.url = url
    response.encoding = requests.utils.get_encoding_from_headers(response.headers)
    return response


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))
