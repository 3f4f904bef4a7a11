#!/usr/bin/env python3
"""Drop files into a running `ferry sync`'s spool at a steady rate and time each one until it
appears in the archive dir (the end of ferry's pipeline: settled, uploaded, verified, moved).

Drop time is taken right after close(), the moment the application is done with the file;
arrival is polled on the archive dir every POLL seconds, so results are +-POLL.
Prints one line of key=value pairs for upload.sh.
"""
import argparse
import os
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--spool", required=True)
ap.add_argument("--archive", required=True)
ap.add_argument("--rate", type=float, default=100.0, help="files per second")
ap.add_argument("--seconds", type=float, default=10.0)
ap.add_argument("--size", type=int, default=64 * 1024)
ap.add_argument("--timeout", type=float, default=120.0, help="give up waiting after this")
ap.add_argument("--poll", type=float, default=0.005)
ap.add_argument(
    "--rename",
    action="store_true",
    help="write each file under a temp name (.NAME.part) and rename it in, as uploaders do; "
    "latency then runs from the rename",
)
a = ap.parse_args()

n = int(a.rate * a.seconds)
# Distinct names per mode: a second run must not find the first run's files in the archive.
names = [f"{'ren' if a.rename else 'lat'}{i:05d}.jpg" for i in range(n)]
dropped = {}
arrived = {}
done_dropping = threading.Event()


def watch():
    # Poll rather than inotify: stdlib only, and 5 ms is small next to a 1 s settle.
    deadline = None
    while True:
        now = time.monotonic()
        with os.scandir(a.archive) as it:
            for e in it:
                if e.name in dropped and e.name not in arrived:
                    arrived[e.name] = now
        if done_dropping.is_set():
            if len(arrived) == n:
                return
            deadline = deadline or now + a.timeout
            if now > deadline:
                return
        time.sleep(a.poll)


t = threading.Thread(target=watch, daemon=True)
t.start()
payload = os.urandom(a.size)
start = time.monotonic()
for i, name in enumerate(names):
    # Absolute schedule, so a slow write does not lower the average rate.
    delay = start + i / a.rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    final = os.path.join(a.spool, name)
    path = os.path.join(a.spool, f".{name}.part") if a.rename else final
    with open(path, "wb") as f:
        f.write(payload[:8] + i.to_bytes(8, "big") + payload[16:])  # distinct contents
    if a.rename:
        os.rename(path, final)
    dropped[name] = time.monotonic()
drop_secs = time.monotonic() - start
done_dropping.set()
t.join()

lat = sorted(arrived[k] - dropped[k] for k in arrived)


def pct(p):
    if not lat:
        return float("nan")
    return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))]


print(
    f"dropped={n} rate={n / drop_secs:.1f} arrived={len(lat)} missing={n - len(lat)} "
    f"p50={pct(50):.3f} p90={pct(90):.3f} p99={pct(99):.3f} "
    f"max={(lat[-1] if lat else float('nan')):.3f} min={(lat[0] if lat else float('nan')):.3f}"
)
