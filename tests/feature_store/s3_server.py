"""A local S3 API for the object-store tests: moto's S3 backend served over HTTP on 127.0.0.1.

    python s3_server.py        prints the port it listens on, then serves until killed

moto (>= 5.1) implements S3's conditional PutObject (If-None-Match: *, If-Match: ETag). Its own server answers
requests on several threads and checks a condition and writes in two steps, so two racing conditional PUTs could
both pass there (real S3 decides them atomically); served on ONE thread, as here, each request is atomic, which
is what the one-writer tests need from a stand-in for S3.
"""
from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
