#!/usr/bin/env python3
"""Parsing and tables for the bench scripts, kept out of bash where arithmetic gets unreadable.

  report.py wrk FILE          wrk --latency output -> "rps<TAB>p50_ms<TAB>p99_ms<TAB>errors"
  report.py upload TSV        upload.sh rows -> markdown tables with ratios
  report.py serve TSV         serve.sh rows (one per run) -> medians and ratios in markdown
"""
import re
import statistics
import sys
from collections import defaultdict

UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(path):
    text = open(path).read()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", text, re.M))

    def ms(v):
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v or "")
        return float(m.group(1)) * UNITS_MS[m.group(2)] if m else float("nan")

    # Socket errors and non-2xx/3xx both mean the run did not measure what it claims.
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errs += int(bad.group(1)) if bad else 0
    total = re.search(r"(\d+) requests in", text)
    print(
        f"{float(rps.group(1)) if rps else 0:.1f}\t{ms(lat.get('50')):.3f}\t"
        f"{ms(lat.get('99')):.3f}\t{errs}\t{total.group(1) if total else 0}"
    )


def rows(path):
    with open(path) as f:
        head = f.readline().rstrip("\n").split("\t")
        return [dict(zip(head, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def x(a, b):
    """a/b as '1.23x', or '-' when either side is missing."""
    try:
        a, b = float(a), float(b)
        return f"{a / b:.2f}x" if b > 0 and a == a and b == b else "-"
    except (TypeError, ValueError):
        return "-"


def upload(path):
    rs = rows(path)
    groups = defaultdict(list)
    for r in rs:
        groups[(r["dataset"], r["tool"])].append(r)

    def med(g, field):
        return statistics.median(float(r[field]) for r in g)

    print("| data set | tool | rounds | wall s | files/s | files/s min–max | MB/s | peak RSS MiB | CPU s (user+sys) | exit | check |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    meds = defaultdict(dict)
    for (ds, tool), g in groups.items():
        wall = med(g, "wall_s")
        files = int(g[0]["files"])
        rates = [files / float(r["wall_s"]) for r in g]

        def fmt(v):
            return f"{v:.0f}" if v >= 10 else f"{v:.2f}"  # 4 large files: 0.xx/s

        exits = ",".join(sorted({r["exit"] for r in g}))
        checks = "; ".join(sorted({r["check"] for r in g}))
        print(
            f"| {ds} | {tool} | {len(g)} | {wall:.2f} | {fmt(files / wall)} | "
            f"{fmt(min(rates))}–{fmt(max(rates))} | {int(g[0]['bytes']) / 1e6 / wall:.1f} | "
            f"{med(g, 'rss_kib') / 1024:.0f} | {med(g, 'cpu_s'):.2f} | {exits} | {checks} |"
        )
        key = "raw PUT" if tool.startswith("raw PUT") else tool
        meds[ds][key] = {f: med(g, f) for f in ("wall_s", "rss_kib", "cpu_s")}
    print()
    print("Ratios of the medians: throughput = ferry MB/s ÷ peer MB/s (above 1 = ferry faster); "
          "RSS = ferry peak RSS ÷ peer peak RSS; CPU = ferry CPU s ÷ peer CPU s.")
    print()
    print("| data set | vs rclone (defaults) | vs rclone --transfers 16 | vs the raw-PUT ceiling |")
    print("|---|---|---|---|")
    for ds, tools in meds.items():
        f = tools.get("ferry")
        cells = []
        for peer in ("rclone", "rclone --transfers 16", "raw PUT"):
            p = tools.get(peer)
            if not f or not p:
                cells.append("-")
                continue
            cells.append(
                f"throughput {x(p['wall_s'], f['wall_s'])}, "
                f"RSS {x(f['rss_kib'], p['rss_kib'])}, CPU {x(f['cpu_s'], p['cpu_s'])}"
            )
        print(f"| {ds} | {cells[0]} | {cells[1]} | {cells[2]} |")


def serve(path):
    rs = rows(path)
    groups = defaultdict(list)
    order = []
    for r in rs:
        k = (r["case"], r["conns"], r["server"])
        if k not in groups:
            order.append(k)
        groups[k].append(r)

    def med(k, field):
        vals = [float(r[field]) for r in groups[k] if r[field] not in ("", "nan")]
        return statistics.median(vals) if vals else float("nan")

    print("Medians over rounds. CPU % is server CPU time ÷ wall time (200% = both cores); "
          "CPU µs/req is server CPU time per completed request; RSS is after the run "
          "(nginx: master + workers; varnish: manager + child).")
    print()
    print("| case | conns | server | req/s | req/s min–max | p50 ms | p99 ms | CPU % | CPU µs/req | RSS MiB | errors |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for k in order:
        rps = [float(r["rps"]) for r in groups[k]]
        errs = sum(int(r["errors"]) for r in groups[k])
        print(
            f"| {k[0]} | {k[1]} | {k[2]} | {med(k, 'rps'):.0f} | {min(rps):.0f}–{max(rps):.0f} | "
            f"{med(k, 'p50_ms'):.2f} | {med(k, 'p99_ms'):.2f} | {med(k, 'cpu_pct'):.0f} | "
            f"{med(k, 'cpu_us_per_req'):.1f} | {med(k, 'rss_kib') / 1024:.1f} | {errs} |"
        )
    head = False
    for case, conns in dict.fromkeys((k[0], k[1]) for k in order):
        f = (case, conns, "ferry")
        ng = (case, conns, "nginx (tcp_nopush on)")
        peers = [k for k in order if k[:2] == (case, conns) and k[2] not in ("ferry", "varnish")]
        if f not in groups or not peers:
            continue
        if not head:
            head = True
            print()
            print("Ratios of ferry to nginx (Debian defaults, tcp_nopush on) and to the best peer "
                  "(highest median req/s of nginx on/off and lighttpd). req/s above 1 = ferry faster; "
                  "p99, CPU/req and RSS above 1 = ferry worse.")
            print()
            print("| case | conns | req/s ÷ nginx | req/s ÷ best | best peer | p99 ÷ nginx | p99 ÷ best | CPU/req ÷ nginx | CPU/req ÷ best | RSS ÷ nginx |")
            print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        best = max(peers, key=lambda k: med(k, "rps"))
        print(
            f"| {case} | {conns} | {x(med(f, 'rps'), med(ng, 'rps')) if ng in groups else '-'} | "
            f"{x(med(f, 'rps'), med(best, 'rps'))} | {best[2]} | "
            f"{x(med(f, 'p99_ms'), med(ng, 'p99_ms')) if ng in groups else '-'} | "
            f"{x(med(f, 'p99_ms'), med(best, 'p99_ms'))} | "
            f"{x(med(f, 'cpu_us_per_req'), med(ng, 'cpu_us_per_req')) if ng in groups else '-'} | "
            f"{x(med(f, 'cpu_us_per_req'), med(best, 'cpu_us_per_req'))} | "
            f"{x(med(f, 'rss_kib'), med(ng, 'rss_kib')) if ng in groups else '-'} |"
        )

    hot = [(c, n) for c, n in dict.fromkeys((k[0], k[1]) for k in order)
           if (c, n, "ferry") in groups and (c, n, "varnish") in groups]
    if not hot:
        return

    def not_cached(k):
        vals = [r.get("not_cached", "") for r in groups[k]]
        return str(sum(int(v) for v in vals)) if vals and all(v not in ("", None) for v in vals) else "-"

    def ratio(k1, k2, field):
        a, b = med(k1, field), med(k2, field)
        return a / b if b > 0 and a == a and b == b else float("nan")

    def mark(ok):
        return "-" if ok is None else ("yes" if ok else "**no**")

    print()
    print("Hot cache: ferry ÷ varnish (medians). Targets: req/s ≥ 1.0×, RSS ≤ 0.25×, p99 ≤ 1.0× "
          "(no worse). Not from cache = responses during the measured runs (all rounds) that "
          "were not cache hits: ferry's /metrics (X-Ferry-Source other than cache), varnish's "
          "client_req − cache_hit.")
    print()
    print("| case | conns | req/s ÷ varnish | p50 ÷ varnish | p99 ÷ varnish | CPU/req ÷ varnish | RSS ÷ varnish | req/s target | RSS target | p99 target | not from cache (ferry / varnish) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for case, conns in hot:
        f, v = (case, conns, "ferry"), (case, conns, "varnish")
        rps, p99, rss = ratio(f, v, "rps"), ratio(f, v, "p99_ms"), ratio(f, v, "rss_kib")
        print(
            f"| {case} | {conns} | {x(med(f, 'rps'), med(v, 'rps'))} | "
            f"{x(med(f, 'p50_ms'), med(v, 'p50_ms'))} | {x(med(f, 'p99_ms'), med(v, 'p99_ms'))} | "
            f"{x(med(f, 'cpu_us_per_req'), med(v, 'cpu_us_per_req'))} | "
            f"{x(med(f, 'rss_kib'), med(v, 'rss_kib'))} | "
            f"{mark(None if rps != rps else rps >= 1.0)} | {mark(None if rss != rss else rss <= 0.25)} | "
            f"{mark(None if p99 != p99 else p99 <= 1.0)} | {not_cached(f)} / {not_cached(v)} |"
        )


if __name__ == "__main__":
    {"wrk": wrk, "upload": upload, "serve": serve}[sys.argv[1]](sys.argv[2])
