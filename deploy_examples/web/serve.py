"""A tiny static server for a web bundle (``rwkv-export web``): loopback only, with the cross-origin
isolation headers (COOP/COEP) ONNX Runtime Web needs for WASM threads.

    python serve.py [--port 8000] [--dir .] [--max-seconds 0] [--max-requests 0]

Only GET/HEAD, files under the folder; each connection times out after 30 s. ``--max-seconds`` /
``--max-requests`` stop the server after that long / that many requests (tests use them; 0 = no limit).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading

HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",  # with COEP: crossOriginIsolated -> SharedArrayBuffer -> threads
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Handler(http.server.SimpleHTTPRequestHandler):
    timeout = 30  # seconds a connection may stay idle
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".onnx": "application/octet-stream",
        ".json": "application/json",
    }
    served = 0

    def end_headers(self):
        for k, v in HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.send_error(405, "read-only server")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)


def serve(directory: str, port: int = 8000, max_seconds: float = 0, max_requests: int = 0, verbose: bool = False):
    handler = functools.partial(Handler, directory=directory)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.verbose = verbose
    httpd.daemon_threads = True
    print(f"serving {directory} at http://127.0.0.1:{httpd.server_address[1]}/", flush=True)
    if max_seconds:
        threading.Timer(max_seconds, httpd.shutdown).start()
    if max_requests:
        count = [0]
        original = httpd.finish_request

        def finish(request, addr):
            original(request, addr)
            count[0] += 1
            if count[0] >= max_requests:
                threading.Thread(target=httpd.shutdown).start()

        httpd.finish_request = finish
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--dir", default=str(__import__("pathlib").Path(__file__).resolve().parent))
    ap.add_argument("--max-seconds", type=float, default=0)
    ap.add_argument("--max-requests", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        serve(a.dir, a.port, a.max_seconds, a.max_requests, a.verbose)
    except OSError as e:
        sys.exit(f"Error: cannot serve on 127.0.0.1:{a.port} ({e.strerror or e})")


if __name__ == "__main__":
    main()
