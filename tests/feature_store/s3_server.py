"""A local S3 API for the object-store tests: moto's S3 backend served over HTTP on 127.0.0.1.

    python s3_server.py        prints the port it listens on, then serves until killed

moto (>= 5.1) implements S3's conditional PutObject (If-None-Match: *, If-Match: ETag), but checks a condition
and writes in two steps, so two racing conditional PUTs could both pass on its threaded server (real S3 decides
them atomically). Here connections are read on threads (a slow or killed client blocks nobody) and requests are
handled by moto one at a time, so each conditional write is atomic, as the one-writer tests need from S3.
"""
from __future__ import annotations

import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


class OneAtATime:
    """A WSGI app that runs the wrapped app for one request at a time (response collected under the lock)."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            result = self.app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                getattr(result, "close", lambda: None)()


def main() -> None:
    app = OneAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
