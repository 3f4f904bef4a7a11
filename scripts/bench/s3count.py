#!/usr/bin/env python3
"""A counting TCP proxy for cluster.sh: forwards 127.0.0.1:PORT to an S3 server and counts
the HTTP requests that pass, by method (the same idea as tests/common/mod.rs FaultProxy).

  s3count.py UPSTREAM_PORT [DELAY_MS]
                               prints "proxy PORT control CPORT" once both listen; a connection
                               to CPORT gets the counts so far as one JSON object
                               ({"HEAD": n, "GET": n, ..., "unparsed": n}) and is closed.
                               DELAY_MS: each request is held that long before it is
                               forwarded (an S3 farther away than loopback).

Bytes are forwarded unchanged as they arrive; the client -> server stream is parsed alongside
(request line, Content-Length or chunked bodies skipped) so requests on kept-alive connections
after a body are still seen. A stream it cannot parse is still forwarded and counted once as
"unparsed". One thread per direction per connection: the S3 side of ferry keeps few, long-lived
connections.
"""
import json
import socket
import sys
import threading
import time
from collections import Counter

UP = int(sys.argv[1])
DELAY = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
counts = Counter()
lock = threading.Lock()


class Parser:
    """Incremental HTTP/1.1 request framing: counts each request head it completes."""

    def __init__(self):
        self.buf = b""
        self.state = "head"  # head | body | chunk-size | chunk-data | trailer | lost
        self.left = 0

    def feed(self, data):
        if self.state == "lost":
            return
        self.buf += data
        while True:
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:
                        self.lose()
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) < 3 or not parts[0].isalpha():
                    self.lose()
                    return
                with lock:
                    counts[parts[0].decode("ascii", "replace")] += 1
                length, chunked = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip() or 0)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    self.state = "chunk-size"
                elif length:
                    self.state, self.left = "body", length
            elif self.state == "body":
                take = min(self.left, len(self.buf))
                self.buf, self.left = self.buf[take:], self.left - take
                if self.left:
                    return
                self.state = "head"
            elif self.state == "chunk-size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                try:
                    n = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    self.lose()
                    return
                if n == 0:
                    self.state = "trailer"
                else:
                    self.state, self.left = "chunk-data", n + 2  # data and its CRLF
            elif self.state == "chunk-data":
                take = min(self.left, len(self.buf))
                self.buf, self.left = self.buf[take:], self.left - take
                if self.left:
                    return
                self.state = "chunk-size"
            elif self.state == "trailer":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                if not line:
                    self.state = "head"

    def lose(self):
        self.state, self.buf = "lost", b""
        with lock:
            counts["unparsed"] += 1


def pump(src, dst, parser):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if DELAY and parser and parser.state == "head" and not parser.buf:
                time.sleep(DELAY)  # this chunk starts a request
            dst.sendall(data)
            if parser:
                parser.feed(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener):
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", UP))
        except OSError:
            client.close()
            continue
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, server, Parser()), daemon=True).start()
        threading.Thread(target=pump, args=(server, client, None), daemon=True).start()


def control(listener):
    while True:
        c, _ = listener.accept()
        with lock:
            body = json.dumps(dict(counts))
        try:
            c.sendall(body.encode() + b"\n")
        finally:
            c.close()


def listen():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    return s


proxy, ctl = listen(), listen()
threading.Thread(target=control, args=(ctl,), daemon=True).start()
print(f"proxy {proxy.getsockname()[1]} control {ctl.getsockname()[1]}", flush=True)
serve(proxy)
