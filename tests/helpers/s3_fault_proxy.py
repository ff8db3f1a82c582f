"""A fault-injecting HTTP proxy in front of the moto S3 server: the tests' real network in between.

Rules match a substring of the request path (and optionally a method) and inject, for the first
`times` matching requests (or every one with times=None): an S3 error response (503 SlowDown,
403 AccessDenied, ...), a connection reset (the socket is closed with RST before any response), or
added latency before forwarding. Everything else is forwarded unchanged. `hits` counts requests
per rule, so a test can check how often a client retried.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    path: str  # substring of the request path
    fault: str  # "503", "403", "500", "reset" or "delay"
    times: int | None = 1  # how many matching requests get the fault; None: all
    method: str | None = None
    delay_s: float = 0.0
    hits: int = 0


class FaultProxy:
    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.fault == "reset":
                    # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if rule is not None and rule.fault == "delay":
                    time.sleep(rule.delay_s)
                elif rule is not None:
                    code, message = S3_ERRORS[int(rule.fault)]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(int(rule.fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer carries the object's length, not the (empty) body's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients killed mid-request (the scenarios do that) are not errors of the proxy

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.path in path and (rule.method is None or rule.method == method):
                    if rule.times is None or rule.hits < rule.times:
                        rule.hits += 1
                        return rule
                    rule.hits += 1  # counted, then forwarded
        return None

    def add(self, path: str, fault: str, times: int | None = 1, **kw) -> Rule:
        rule = Rule(path, fault, times, **kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
