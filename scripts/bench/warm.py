#!/usr/bin/env python3
"""Warms a cache in front of the benchmark's files and proves every key is then a cache hit.

  warm.py warm KIND PORT FILES SIZE REPEAT   GETs /static/f0000.jpg .. f{FILES-1}.jpg REPEAT
                                             times (passes over all keys), then once more and
                                             checks every answer: 200, SIZE bytes, and a hit
                                             (KIND ferry: X-Ferry-Source: cache; KIND varnish:
                                             X-Varnish with two ids, i.e. served from the
                                             cache). Exit 1 with a summary if any key is not.
  warm.py ferry-misses PORT                  from ferry's /metrics: requests on the mount that
                                             were not answered from the cache (cumulative)

One keep-alive connection per thread, a few threads, so warming 1000 keys takes seconds.
"""
import http.client
import re
import sys
import threading
from collections import Counter

THREADS = 4


def get(conn, path):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    return r.status, len(body), r.getheader("X-Ferry-Source"), r.getheader("X-Varnish"), r.getheader("Age")


def is_hit(kind, src, xv):
    if kind == "ferry":
        return src == "cache"
    # Varnish: "X-Varnish: <this request's id> <id of the request that filled the object>".
    return bool(xv) and len(xv.split()) == 2


def warm(kind, port, files, size, repeat):
    keys = [f"/static/f{i:04d}.jpg" for i in range(files)]
    verdicts = Counter()
    bad = []
    lock = threading.Lock()

    def worker(part):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(repeat):
            for k in part:
                get(conn, k)
        for k in part:
            status, n, src, xv, age = get(conn, k)
            ok = status == 200 and n == size and is_hit(kind, src, xv)
            with lock:
                verdicts["hit" if ok else "not a hit"] += 1
                if not ok and len(bad) < 5:
                    bad.append(f"{k}: {status}, {n} bytes, X-Ferry-Source={src}, X-Varnish={xv}, Age={age}")
        conn.close()

    ts = [threading.Thread(target=worker, args=(keys[i::THREADS],)) for i in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    hits = verdicts["hit"]
    print(f"{kind}: {hits}/{files} keys answered from the cache after {repeat} warm-up pass(es)")
    if hits != files:
        for b in bad:
            print("  " + b)
        sys.exit(1)


def ferry_misses(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    n = 0
    for labels, v in re.findall(r"^ferry_http_requests_total\{([^}]*)\}\s+(\S+)", text, re.M):
        if 'source="cache"' not in labels:
            n += int(float(v))
    print(n)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "warm":
        warm(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif cmd == "ferry-misses":
        ferry_misses(int(sys.argv[2]))
    else:
        sys.exit(f"unknown command {cmd}")
