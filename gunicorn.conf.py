"""Gunicorn settings for the portal, whose uploads take hours.

Used by `make run` (tools/devserver.py) and by the web service of docker-compose.yml, which
overrides the address with `--bind 0.0.0.0:8000`. Command-line options win over this file.
"""

import os

# Loopback by default: on a laptop the portal is for this machine only.
bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"

# Threads, not processes, carry requests: a tus PATCH that streams a chunk for minutes holds one
# thread and blocks nobody else, and a thread waiting on the network costs little memory. Enough
# threads that a page or status request never queues behind the uploads in progress (20 uploads
# at once held all of 16 threads; uploads/request_body.py keeps each one nearly off the GIL).
# Each thread keeps a database connection of its own (CONN_MAX_AGE): 2 x 32 plus the workers
# stay under PostgreSQL's default max_connections of 100.
# The worker is gthread, but a thread gets a request only once it is all there (or is an upload's
# chunk): a client slow to send its request never holds a thread (portal/gunicorn_worker.py).
worker_class = "portal.gunicorn_worker.PortalWorker"
workers = 2
threads = 32

# `timeout` is not a limit on a request here. With gthread the worker's main loop reports to the
# master every second whatever its threads are doing, so an upload may take as long as it takes;
# this only replaces a worker process that hangs as a whole (deadlock, stuck C call) for 2 minutes.
timeout = 120
# On a restart (SIGTERM, SIGHUP) requests in progress get this long to finish. An upload cut off
# after that loses nothing: tus resumes it from the last byte the server stored.
graceful_timeout = 30
# Idle keep-alive connections (e.g. between two chunks of one upload) stay open this long.
keepalive = 15

# A web server started again while the workers of one that died still finish their requests
# (they keep the listening socket up to graceful_timeout) shares the port instead of failing to
# bind (SO_REUSEPORT, Linux; only sockets of the same user can share it). `make run` and compose
# start this file's server; tools/devserver.py checks first that nothing else listens there.
reuse_port = True

# Request line and headers stay small (tus metadata is a header: file name and type, base64).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 16384

# The heartbeat file on tmpfs where there is one: a container's disk layer can stall it.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# No runtime control socket (gunicorn 25+): its default path is one per user, so a second
# gunicorn on the machine (tests, another checkout) would fight over it. Restart instead.
control_socket_disable = True

# Access log on stdout: path only (%(U)s, no query string), status, bytes, seconds taken.
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss "%(a)s"'
