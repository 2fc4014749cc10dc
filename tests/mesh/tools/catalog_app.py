"""The service catalog test's apps: a small HTTP/1.1 server, plain or TLS.

    python -m tests.mesh.tools.catalog_app PORT [--fail-flag FILE] [--tls CERT KEY CA]

Answers every GET with 200 and the word `ok`. While FILE exists, one request in five (the 5th,
10th, ... since the flag appeared) gets a 500 instead: 20 % failures, switched on and off by
the test without restarting the app. With --tls it is an in-cluster stand-in: TLS with a pod
certificate, a client certificate from CA required (as a linkerd2-proxy's inbound requires
mTLS of meshed peers). Prints `ready` once listening.
"""

from __future__ import annotations

import argparse
import http.server
import ssl
import threading
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--fail-flag", type=Path)
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"))
    args = parser.parse_args()
    lock, failing = threading.Lock(), [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status = 200
            if args.fail_flag is not None and args.fail_flag.exists():
                with lock:
                    failing[0] += 1
                    status = 500 if failing[0] % 5 == 0 else 200
            body = b"ok\n" if status == 200 else b"injected failure\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    if args.tls:
        cert, key, ca = args.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
