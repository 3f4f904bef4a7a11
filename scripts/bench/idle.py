"""Holds N idle TCP connections to a server (sending nothing) for a while.

    python3 idle.py HOST:PORT N HOLD_SECONDS

Prints "open N" once all are connected, then after HOLD_SECONDS "still M": how many the
server has not closed. Used by resources.sh to load ferry serve with idle clients.
"""
import resource
import socket
import sys
import time

addr, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
host, port = addr.rsplit(":", 1)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect((host, int(port)))
    except OSError as e:
        print(f"connect {i} failed: {e}", file=sys.stderr)
        s.close()
        break
    s.setblocking(False)
    socks.append(s)
print(f"open {len(socks)}", flush=True)
time.sleep(hold)
alive = 0
for s in socks:
    try:
        if s.recv(1) == b"":
            continue  # closed by the server
        alive += 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(f"still {alive}", flush=True)
