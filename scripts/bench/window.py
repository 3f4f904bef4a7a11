#!/usr/bin/env python3
"""The 404 window for cluster.sh: drop files into node A's spool at a steady rate (written
under a temp name and renamed in, as uploaders do) and poll node B for each new key from the
moment of its rename until B first answers 200. Prints one line of key=value pairs.

Each key is polled once right after its rename (by threads that do only that), then again at
most every --poll seconds; --threads threads with keep-alive connections share the re-polls
of the outstanding keys, so when many are outstanding the real interval is longer: it is
reported (gap = the time between the last non-200 answer and the first 200, i.e. how much of
the window is polling resolution; first_poll = drop to the first request for the key).
"""
import argparse
import collections
import http.client
import os
import queue
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--spool", required=True)
ap.add_argument("--port", type=int, required=True, help="node B's HTTP port")
ap.add_argument("--mount", default="/static/")
ap.add_argument("--prefix", required=True, help="key prefix (distinct per run)")
ap.add_argument("--rate", type=float, default=100.0, help="files per second")
ap.add_argument("--seconds", type=float, default=5.0)
ap.add_argument("--size", type=int, default=4096)
ap.add_argument("--poll", type=float, default=0.02, help="min seconds between polls of a key")
ap.add_argument("--threads", type=int, default=16, help="first-poll threads, and as many re-polling threads")
ap.add_argument("--timeout", type=float, default=30.0, help="give up on a key after this")
a = ap.parse_args()

n = int(a.rate * a.seconds)
names = [f"{a.prefix}{i:05d}.jpg" for i in range(n)]
dropped = {}  # name -> monotonic time of the rename
first_ok = {}  # name -> monotonic time the first 200 arrived
last_bad = {}  # name -> monotonic time the last non-200 answer arrived
first_sent = {}  # name -> monotonic time its first poll was sent
source = {}  # name -> X-Ferry-Source of the first 200
statuses = collections.Counter()
polls = collections.Counter()
due = collections.deque()  # (next poll time, name): keys polled before and not yet 200
first_q = queue.Queue()  # keys just dropped, for the first-poll threads
cv = threading.Condition()
outstanding = 0  # dropped, neither answered 200 nor given up on
done_dropping = threading.Event()


def connect():
    return http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)


def poll(conn, name):
    """One GET for name; records it; returns the connection to use next."""
    global outstanding
    sent = time.monotonic()
    try:
        conn.request("GET", a.mount + name)
        r = conn.getresponse()
        r.read()
        status, src = r.status, r.getheader("X-Ferry-Source")
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = connect()
        status, src = "error", None
    now = time.monotonic()
    with cv:
        first_sent.setdefault(name, sent)
        statuses[status] += 1
        polls[name] += 1
        if status == 200:
            first_ok[name] = now
            source[name] = src or "?"
            outstanding -= 1
        else:
            last_bad[name] = now
            if now - dropped[name] < a.timeout:
                due.append((now + a.poll, name))
            else:
                outstanding -= 1
        cv.notify_all()
    return conn


def first_poller():
    # Its own threads, so the first request for a key follows its drop at once, however
    # busy the re-polling is.
    conn = connect()
    while True:
        name = first_q.get()
        if name is None:
            return
        conn = poll(conn, name)


def repoller():
    conn = connect()
    while True:
        with cv:
            while not due:
                if done_dropping.is_set() and outstanding == 0:
                    return
                cv.wait(0.05)
            at, name = due.popleft()
        wait = at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        conn = poll(conn, name)


firsts = [threading.Thread(target=first_poller, daemon=True) for _ in range(a.threads)]
repolls = [threading.Thread(target=repoller, daemon=True) for _ in range(a.threads)]
for t in firsts + repolls:
    t.start()
payload = os.urandom(a.size)
start = time.monotonic()
for i, name in enumerate(names):
    delay = start + i / a.rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    tmp = os.path.join(a.spool, f".{name}.part")
    with open(tmp, "wb") as f:
        f.write(payload[:8] + i.to_bytes(8, "big") + payload[16:])  # distinct contents
    os.rename(tmp, os.path.join(a.spool, name))
    with cv:
        dropped[name] = time.monotonic()
        outstanding += 1
    first_q.put(name)  # polled at once: a browser asking right after the drop
drop_secs = time.monotonic() - start
for _ in firsts:
    first_q.put(None)
for t in firsts:
    t.join()
done_dropping.set()
for t in repolls:
    t.join()

lat = sorted(first_ok[k] - dropped[k] for k in first_ok)
first = sorted(first_sent[k] - dropped[k] for k in first_sent)
gaps = sorted(first_ok[k] - last_bad[k] for k in first_ok if k in last_bad)


def pct(v, p):
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


src = collections.Counter(source.values())
print(
    f"dropped={n} rate={n / drop_secs:.1f} served={len(lat)} missing={n - len(lat)} "
    f"p50={pct(lat, 50):.3f} p90={pct(lat, 90):.3f} p99={pct(lat, 99):.3f} "
    f"max={(lat[-1] if lat else float('nan')):.3f} min={(lat[0] if lat else float('nan')):.3f} "
    f"gap_p50={pct(gaps, 50):.3f} first_poll_p50={pct(first, 50):.3f} first_poll_p99={pct(first, 99):.3f} first_try={len(lat) - len(gaps)} "
    f"polls={sum(polls.values())} "
    f"sources={','.join(f'{k}:{v}' for k, v in sorted(src.items())) or '-'} "
    f"statuses={','.join(f'{k}:{v}' for k, v in sorted(statuses.items(), key=str)) or '-'}"
)
