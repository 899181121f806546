"""A loopback HTTP server that serves the MNIST files, for the download tests (tests/test_data_faults.py and
tests/test_bench_data.py): modes in the path make it answer 404, a truncated, corrupted or cut body."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections import Counter


class MnistServer:
    """A threading HTTP server on an ephemeral loopback port; counts requests per path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=60)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with server.lock:
                    server.requests[self.path] += 1
                _, mode, name = self.path.split("/", 2)
                body = server.files.get(name)
                if body is None or mode == "missing":
                    self.send_error(404)
                    return
                if mode == "together":
                    with contextlib.suppress(threading.BrokenBarrierError):  # then the request count tells
                        server.barrier.wait()
                if mode == "truncated":
                    body = body[: len(body) // 2]
                elif mode == "corrupt":
                    body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{mode}/"

    def count(self, mode: str, spec) -> int:
        return self.requests[f"/{mode}/{spec.name}"]
