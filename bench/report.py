#!/usr/bin/env python3
"""Formats bench/run.sh's measurements as Markdown (bench/results/latest.md).

Reads the tab-separated files run.sh wrote into its temp dir and prints the
report: every measure for direct MariaDB, HAProxy nbthread 1 and 2 and
tiproxy, the ratio of tiproxy to the *better* HAProxy configuration for
that measure, the range of the per-round ratios, and whether issue 15's
target is met. Standard library only.
"""

import argparse
import os
import statistics

HAPROXIES = ("haproxy1", "haproxy2")
NAMES = {
    "direct": "direct",
    "haproxy1": "HAProxy nt1",
    "haproxy2": "HAProxy nt2",
    "tiproxy": "tiproxy",
    "tiproxy-tls": "tiproxy (TLS clients)",
    "baseline": "baseline tiproxy",
}


def rows(path, ncols):
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= ncols:
                out.append(parts)
    return out


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def verdict(ratio, target, higher_is_better):
    if ratio is None:
        return f"{'≥' if higher_is_better else '≤'} {target}x (no data)"
    ok = ratio >= target if higher_is_better else ratio <= target
    return f"{'≥' if higher_is_better else '≤'} {target}x {'met' if ok else '**NOT met**'}"


def absolute(value, target, higher_is_better, unit):
    if value is None:
        return f"{'≥' if higher_is_better else '≤'} {target} {unit} (no data)"
    ok = value >= target if higher_is_better else value <= target
    return f"{'≥' if higher_is_better else '≤'} {target} {unit} {'met' if ok else '**NOT met**'}"


def better(values, higher_is_better):
    """The better HAProxy value and its name."""
    cand = [(values.get(h), h) for h in HAPROXIES if values.get(h) is not None]
    if not cand:
        return None, None
    return (max if higher_is_better else min)(cand)


def ratio_range(per_round, higher_is_better):
    """tiproxy / better HAProxy of the same round, min-max over rounds."""
    rs = []
    for vals in per_round.values():
        b, _ = better(vals, higher_is_better)
        if b and vals.get("tiproxy") is not None:
            rs.append(vals["tiproxy"] / b)
    if not rs:
        return "-"
    return f"{min(rs):.2f}-{max(rs):.2f}"


def throughput(d, targets, out):
    runs = rows(os.path.join(d, "runs.tsv"), 10)
    if not runs:
        return
    specs = []
    for r in runs:
        if (r[0], r[1]) not in specs:
            specs.append((r[0], r[1]))
    out.append("## Throughput and proxy CPU (sysbench)\n")
    out.append(
        "QPS = total queries / total time over the rounds (the per-round range in brackets); "
        "CPU = proxy process utime+stime per query. Ratio = tiproxy / the better HAProxy "
        "(higher QPS, lower CPU); range = the same ratio per round.\n"
    )
    head = ["workload", "threads", "measure"] + [NAMES[t] for t in targets] + [
        "tiproxy / better HAProxy",
        "per-round range",
        "target",
    ]
    out.append("| " + " | ".join(head) + " |")
    out.append("| " + " | ".join(["---"] * 3 + ["---:"] * (len(targets) + 2) + ["---"]) + " |")
    for wl, th in specs:
        q, tm, cpu, cq = {}, {}, {}, {}
        per_q, per_c, qrange = {}, {}, {}
        for r in runs:
            if (r[0], r[1]) != (wl, th):
                continue
            t, rnd = r[2], r[3]
            qps, queries, c = num(r[4]), num(r[5]), num(r[6])
            if qps is None or queries is None:
                continue
            q[t] = q.get(t, 0) + queries
            tm[t] = tm.get(t, 0) + queries / qps
            qrange.setdefault(t, []).append(qps)
            per_q.setdefault(rnd, {})[t] = qps
            if c is not None and queries > 0:
                cpu[t] = cpu.get(t, 0) + c
                cq[t] = cq.get(t, 0) + queries
                per_c.setdefault(rnd, {})[t] = c / queries
        qps = {t: q[t] / tm[t] for t in q if tm[t] > 0}
        us = {t: cpu[t] / cq[t] * 1e6 for t in cpu if cq[t] > 0}
        many = int(th) > 1
        for measure, vals, spec, hib, target, per in (
            ("QPS", qps, ".0f", True, 1.05 if many else 1.0, per_q),
            ("proxy CPU µs / query", us, ".1f", False, 0.85 if many else 0.9, per_c),
        ):
            b, _ = better(vals, hib)
            ratio = vals["tiproxy"] / b if b and vals.get("tiproxy") is not None else None
            cells = []
            for t in targets:
                v = vals.get(t)
                cell = fmt(v, spec)
                if measure == "QPS" and t in qrange and len(qrange[t]) > 1:
                    cell += f" ({min(qrange[t]):.0f}-{max(qrange[t]):.0f})"
                cells.append(cell)
            out.append(
                "| "
                + " | ".join(
                    [wl, th, measure]
                    + cells
                    + [fmt(ratio, ".2f") + ("x" if ratio else ""), ratio_range(per, hib),
                       verdict(ratio, target, hib)]
                )
                + " |"
            )
    out.append("")


def versus_baseline(d, out):
    runs = rows(os.path.join(d, "runs.tsv"), 10)
    if not any(r[2] == "baseline" for r in runs):
        return
    out.append("## This build vs the baseline build (same run, alternating)\n")
    out.append("| workload | threads | measure | this build | baseline | ratio | per-round range |")
    out.append("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    specs = []
    for r in runs:
        if (r[0], r[1]) not in specs:
            specs.append((r[0], r[1]))
    for wl, th in specs:
        per = {}
        for r in runs:
            if (r[0], r[1]) == (wl, th) and r[2] in ("tiproxy", "baseline") and num(r[4]) and num(r[5]):
                c = num(r[6])
                per.setdefault(r[3], {})[r[2]] = (num(r[4]), c / num(r[5]) * 1e6 if c is not None else None)
        for i, measure in ((0, "QPS"), (1, "proxy CPU µs / query")):
            pairs = [(v["tiproxy"][i], v["baseline"][i]) for v in per.values()
                     if "tiproxy" in v and "baseline" in v and v["tiproxy"][i] and v["baseline"][i]]
            if not pairs:
                continue
            a = statistics.mean(x for x, _ in pairs)
            b = statistics.mean(y for _, y in pairs)
            rs = [x / y for x, y in pairs]
            out.append(f"| {wl} | {th} | {measure} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {min(rs):.2f}-{max(rs):.2f} |")
    out.append("")


def latency(d, targets, nq, out):
    lat = rows(os.path.join(d, "latency.tsv"), 5)
    if not lat:
        return
    by = {}
    for t, rnd, mean, p50, p99 in lat:
        by.setdefault(t, []).append((num(mean), num(p50), num(p99), rnd))
    out.append(f"## Added latency (one connection, {nq} sequential `SELECT 1` per round)\n")
    out.append(
        "Median over the rounds of each round's p50 and p99; added = target - direct. "
        "Ratio = tiproxy's added latency / the better HAProxy's.\n"
    )
    if "direct" not in by:
        out.append("No direct runs: nothing to subtract.\n")
        return
    d50 = statistics.median(x[1] for x in by["direct"])
    d99 = statistics.median(x[2] for x in by["direct"])
    out.append("| target | p50 (µs) | p99 (µs) | added p50 (µs) | added p99 (µs) |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    added = {}
    for t in targets:
        if t not in by:
            continue
        p50 = statistics.median(x[1] for x in by[t])
        p99 = statistics.median(x[2] for x in by[t])
        added[t] = (p50 - d50, p99 - d99)
        a = "-" if t == "direct" else f"{p50 - d50:+.1f}"
        b = "-" if t == "direct" else f"{p99 - d99:+.1f}"
        out.append(f"| {NAMES[t]} | {p50:.1f} | {p99:.1f} | {a} | {b} |")
    out.append("")
    for i, label in ((0, "p50"), (1, "p99")):
        vals = {t: v[i] for t, v in added.items()}
        b, name = better(vals, False)
        if b is None or "tiproxy" not in vals:
            continue
        ratio = vals["tiproxy"] / b if b > 0 else None
        tgt = verdict(ratio, 0.8, False) if ratio is not None else "≤ 0.8x (HAProxy adds nothing measurable)"
        out.append(
            f"- added {label}: tiproxy {vals['tiproxy']:+.1f} µs, better HAProxy ({NAMES[name]}) "
            f"{b:+.1f} µs: {fmt(ratio, '.2f')}x, target {tgt}"
        )
    out.append("")


def cpu_split(d, targets, out):
    """User and kernel CPU and context switches per query, per proxy."""
    runs = [r for r in rows(os.path.join(d, "runs.tsv"), 14) if r[2] in targets and r[2] != "direct"]
    if not runs:
        return
    out.append("## Where the proxy CPU goes (sysbench, same runs)\n")
    out.append(
        "Per query, summed over the rounds: user and kernel CPU of the proxy process "
        "(utime, stime), and context switches of all its threads (voluntary: it slept; "
        "involuntary: it was preempted, mostly by the thread its own send woke).\n"
    )
    out.append("| workload | threads | proxy | user µs / query | kernel µs / query | voluntary cs / query | involuntary cs / query |")
    out.append("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    seen = []
    for r in runs:
        if (r[0], r[1], r[2]) not in seen:
            seen.append((r[0], r[1], r[2]))
    for wl, th, t in seen:
        tot = [0.0] * 5
        for r in runs:
            if (r[0], r[1], r[2]) != (wl, th, t):
                continue
            vals = [num(r[5])] + [num(x) for x in r[10:14]]
            if any(v is None for v in vals):
                continue
            tot = [a + b for a, b in zip(tot, vals)]
        q = tot[0]
        if q <= 0:
            continue
        out.append(
            f"| {wl} | {th} | {NAMES.get(t, t)} | {tot[1] / q * 1e6:.2f} | {tot[2] / q * 1e6:.2f} "
            f"| {tot[3] / q:.3f} | {tot[4] / q:.3f} |"
        )
    out.append("")


def syscalls(d, out):
    sys_rows = rows(os.path.join(d, "syscalls.tsv"), 8)
    if not sys_rows:
        return
    out.append("## Syscalls per query (strace -f -c over a fixed number of point selects, 16 threads)\n")
    out.append("| proxy | queries | total / query | writes | reads | reads that found nothing (EAGAIN) | epoll_wait | other |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t, q, tot, w, r, e, p, o in sys_rows:
        qn = num(q)
        per = [fmt(num(x) / qn if qn and num(x) is not None else None, ".2f") for x in (tot, w, r, e, p, o)]
        out.append(f"| {NAMES.get(t, t)} | {q} | " + " | ".join(per) + " |")
    out.append("")


def bigrows(d, targets, out):
    big = rows(os.path.join(d, "bigrows.tsv"), 5)
    if not big:
        return
    out.append("## Large rows (128 rows of 1 MiB per query, streamed)\n")
    out.append("| target | GB/s (rounds) | proxy CPU s per GB | target |")
    out.append("| --- | ---: | ---: | --- |")
    for t in targets:
        rs = [r for r in big if r[0] == t]
        if not rs:
            continue
        b = sum(num(r[2]) or 0 for r in rs)
        s = sum(num(r[3]) or 0 for r in rs)
        rates = [num(r[2]) / num(r[3]) / 1e9 for r in rs if num(r[3])]
        c = [num(r[4]) for r in rs if num(r[4]) is not None]
        gbs = b / s / 1e9 if s else None
        cpu = sum(c) / (b / 1e9) if c and b else None
        tgt = ""
        if t == "tiproxy":
            tgt = absolute(gbs, 1.5, True, "GB/s") + "; " + absolute(cpu, 0.5, False, "s/GB")
        rng = f" ({min(rates):.2f}-{max(rates):.2f})" if len(rates) > 1 else ""
        out.append(f"| {NAMES[t]} | {fmt(gbs, '.2f')}{rng} | {fmt(cpu, '.3f')} | {tgt} |")
    out.append("")


def idle(d, n, out):
    rs = rows(os.path.join(d, "idle.tsv"), 9)
    if not rs:
        return
    out.append(f"## Idle memory ({n} authenticated idle client connections, fresh proxy processes, RSS in KiB)\n")
    out.append(
        "Growth per connection = (RSS with connections - RSS before) / opened, first cycle. "
        "A second cycle re-opens as many after all were closed.\n"
    )
    out.append(
        "| proxy | opened | failed | open time (s) | RSS before | RSS with conns | after close "
        "| 2nd cycle with conns | 2nd cycle after close | KB per conn | target |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rs:
        t = r[0]
        opened, before, with_conns = num(r[1]), num(r[4]), num(r[5])
        per = (with_conns - before) * 1024 / opened / 1000 if opened and with_conns is not None and before is not None else None
        tgt = ""
        if t == "tiproxy":
            tgt = absolute(per, 3.0, False, "KB")
        elif t == "tiproxy-tls":
            tgt = absolute(per, 6.0, False, "KB")
        out.append(f"| {NAMES.get(t, t)} | " + " | ".join(r[1:9]) + f" | {fmt(per, '.2f')} | {tgt} |")
    out.append("")


def raw(d, out):
    runs = rows(os.path.join(d, "runs.tsv"), 10)
    if runs:
        out.append("## Raw sysbench runs\n")
        out.append("| workload | threads | target | round | QPS | queries | proxy CPU (s) | p95 (ms) | ignored errors | reconnects |")
        out.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in runs:
            out.append("| " + " | ".join(r[:10]) + " |")
        out.append("")
    lat = rows(os.path.join(d, "latency.tsv"), 5)
    if lat:
        out.append("## Raw latency runs\n")
        out.append("| target | round | mean (µs) | p50 (µs) | p99 (µs) |")
        out.append("| --- | ---: | ---: | ---: | ---: |")
        for r in lat:
            out.append("| " + " | ".join(r) + " |")
        out.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--baseline", default="")
    ap.add_argument("--lat-queries", default="?")
    ap.add_argument("--idle-conns", default="?")
    ap.add_argument("--elapsed", default="?")
    a = ap.parse_args()
    targets = ["direct", "haproxy1", "haproxy2", "tiproxy"] + (["baseline"] if a.baseline else [])
    out = ["# tiproxy benchmark: direct MariaDB vs HAProxy (nbthread 1, 2) vs tiproxy\n"]
    with open(os.path.join(a.dir, "header.md")) as f:
        out.append(f.read())
    throughput(a.dir, targets, out)
    cpu_split(a.dir, targets, out)
    versus_baseline(a.dir, out)
    latency(a.dir, targets, a.lat_queries, out)
    syscalls(a.dir, out)
    bigrows(a.dir, targets, out)
    idle(a.dir, a.idle_conns, out)
    drain = os.path.join(a.dir, "drain.md")
    if os.path.exists(drain):
        out.append("## Drain (bench/migration.sh: idle sessions off a TiDB double that shuts down)\n")
        with open(drain) as f:
            out.append(f.read())
    findings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile-notes.md")
    if os.path.exists(findings):
        with open(findings) as f:
            out.append(f.read())
    notes = os.path.join(a.dir, "notes.txt")
    if os.path.exists(notes) and os.path.getsize(notes):
        out.append("## Problems seen\n")
        with open(notes) as f:
            out.extend(f"- {line.rstrip()}" for line in f if line.strip())
        out.append("")
    raw(a.dir, out)
    out.append(
        f"Total benchmark time: {a.elapsed} s. Re-run: `bench/run.sh` (env: TIPROXY_BIN, "
        "TIPROXY_BASELINE_BIN, BENCH_SECONDS, BENCH_ROUNDS, BENCH_WORKLOADS, BENCH_IDLE_CONNS, "
        "BENCH_LAT_QUERIES, BENCH_PHASES, BENCH_KEEP_TMP=1)."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
