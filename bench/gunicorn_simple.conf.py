"""gunicorn.conf.py with the two ingest paths that exist for throughput taken out, for comparison
only (bench/ingest.py --servers ...,simple; bench/load.py --ingest simple). Not for production.

In each gunicorn worker, after the app is loaded:
- tus PATCH bodies are read through Django's `request.read()` (uploads/request_body.py's portable
  path) instead of straight from the socket;
- staging writes are no longer serialised per process (uploads/staging.py `_ONE_WRITER`).
The product code is unchanged: this swaps two module attributes at run time.
"""

import contextlib
from pathlib import Path

# Every setting of the repository's gunicorn.conf.py (workers, threads, timeouts, logs).
exec(compile((Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"))


def post_worker_init(worker):
    from uploads import request_body, staging

    request_body.body_of = lambda request, length: request_body.RequestBody(request)
    staging._ONE_WRITER = contextlib.nullcontext()
    worker.log.info("bench: simple ingest path (request.read(), no staging writer lock)")
