#!/usr/bin/env python3
"""Summarises bench/results/results.jsonl: medians and spreads per scenario
and target, ratios keepwire / peer, and SVG bar charts (latency at equal
load, memory per idle connection). Prints Markdown for BENCHMARKS.md."""
import collections
import json
import os
import statistics
import sys

paths = sys.argv[1:] or ["bench/results/results.jsonl"]
outdir = os.path.dirname(paths[0])
rows = [json.loads(l) for path in paths for l in open(path) if l.strip()]
by = collections.defaultdict(list)
errors = collections.defaultdict(list)
for r in rows:
    (errors if "error" in r else by)[r["label"]].append(r)


def med(label, key):
    vals = [r[key] for r in by.get(label, []) if r.get(key) is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def fmt(m, lo, hi, unit=""):
    if m is None:
        return "n/a"
    if abs(m) >= 100:
        return f"{m:,.0f}{unit} ({lo:,.0f}–{hi:,.0f})"
    return f"{m:.2f}{unit} ({lo:.2f}–{hi:.2f})"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) else "n/a"


targets = ["keepwire", "node-ws", "python-ws", "socketio", "mosquitto"]
runs = max((len(v) for k, v in by.items() if not k.startswith(("sweep-", "cdf-"))), default=0)
print(f"Runs per cell: {runs} (median, with min–max in brackets).\n")
for label, errs in sorted(errors.items()):
    print(f"- **{label}** failed in {len(errs)} run(s): `{errs[0]['error'].strip().splitlines()[-1] if errs[0]['error'].strip() else 'no output'}`")
if errors:
    print()

print("### Idle connections\n")
print("| target | bytes per connection | server CPU idle | generator CPU | keepwire ÷ target (memory) |")
print("|---|---|---|---|---|")
kw_mem = med("idle-keepwire", "bytes_per_conn")[0]
for t in targets + ["keepwire-before"]:
    m = med(f"idle-{t}", "bytes_per_conn")
    print(f"| {t} | {fmt(*m)} | {fmt(*med(f'idle-{t}', 'server_idle_cpu'))} | {fmt(*med(f'idle-{t}', 'generator_cpu'))} | {ratio(kw_mem, m[0])} |")

print("\n### Ingest (keepwire: confirmed durable sends)\n")
print("| target | confirmed sends/s | server CPU | generator CPU |")
print("|---|---|---|---|")
for t in ("keepwire", "keepwire-before"):
    print(f"| {t} | {fmt(*med(f'ingest-{t}', 'confirmed_per_sec'))} | {fmt(*med(f'ingest-{t}', 'server_cpu'))} | {fmt(*med(f'ingest-{t}', 'generator_cpu'))} |")
print(f"\nafter ÷ before: {ratio(med('ingest-keepwire', 'confirmed_per_sec')[0], med('ingest-keepwire-before', 'confirmed_per_sec')[0])}")

print("\n### Catch-up and reconnect latency (keepwire)\n")
print("| scenario | figure |")
print("|---|---|")
print(f"| catch-up of 100,000 messages | {fmt(*med('catchup-keepwire', 'sync_secs'), ' s')}, {fmt(*med('catchup-keepwire', 'persisted_per_sec'))} messages/s, client peak {fmt(*med('catchup-keepwire', 'client_peak_rss_kib'), ' KiB')} |")
fp = [r for r in by.get("footprint-keepwire", [])]
if fp:
    for name in ("keepwire-agent", "keepwire agent"):
        vals = [r["agent_rss_kib"][name] for r in fp]
        print(f"| `{name}` idle, logged in, connected (VmRSS) | {fmt(statistics.median(vals), min(vals), max(vals), ' KiB')} |")
    for name, size in fp[0]["binary_bytes"].items():
        print(f"| `{name}` release binary | {size / 1e6:.1f} MB |")
print(f"| network up to caught up, 100 ms RTT, 10 waiting | {fmt(*med('reconnect-latency-keepwire', 'median_ms'), ' ms')} = {fmt(*med('reconnect-latency-keepwire', 'round_trips'))} round trips |")

print("\n### Fanout, 10 groups × 100 subscribers, 10 publishers, 100-byte payloads\n")
for load, title in (("full", "as fast as the server takes them"), ("55k", "55 msg/s per publisher (≈ 55k deliveries/s offered)"), ("27k", "27 msg/s per publisher (≈ 27k deliveries/s offered)")):
    print(f"**{title}**\n")
    print("| target | deliveries/s | p50 ms | p99 ms | max ms | server CPU | generator CPU | keepwire ÷ target (deliveries, p99) |")
    print("|---|---|---|---|---|---|---|---|")
    kd = med(f"fanout-{load}-keepwire", "deliveries_per_sec")[0]
    kp = med(f"fanout-{load}-keepwire", "p99_ms")[0]
    for t in targets + (["keepwire-before"] if load == "full" else []):
        l = f"fanout-{load}-{t}"
        d = med(l, "deliveries_per_sec")
        p99 = med(l, "p99_ms")
        print(f"| {t} | {fmt(*d)} | {fmt(*med(l, 'p50_ms'))} | {fmt(*p99)} | {fmt(*med(l, 'max_ms'))} | {fmt(*med(l, 'server_cpu'))} | {fmt(*med(l, 'generator_cpu'))} | {ratio(kd, d[0])}, {ratio(kp, p99[0])} |")
    print()


print("### Reconnect storm\n")
print("| jitter | all caught up (s after restart) | p50 | p99 | peak attempts/s (1 s) | peak attempts/s (100 ms) | peak attempts/s over the outage (1 s) | attempts after restart | lost | duplicated | out of order | server CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for j in ("jitter", "nojitter"):
    l = f"storm-{j}-keepwire"
    print(f"| {'full' if j == 'jitter' else 'none'} | {fmt(*med(l, 'all_caught_up_secs'))} | {fmt(*med(l, 'caught_up_p50_secs'))} | {fmt(*med(l, 'caught_up_p99_secs'))} | {fmt(*med(l, 'peak_attempts_per_sec_1s'))} | {fmt(*med(l, 'peak_attempts_per_sec_100ms'))} | {fmt(*med(l, 'peak_attempts_per_sec_1s_whole'))} | {fmt(*med(l, 'attempts_after_restart'))} | {sum(r.get('lost', 0) for r in by.get(l, []))} | {sum(r.get('duplicated', 0) for r in by.get(l, []))} | {sum(r.get('out_of_order', 0) for r in by.get(l, []))} | {fmt(*med(l, 'server_cpu'))} |")
j1 = med("storm-jitter-keepwire", "peak_attempts_per_sec_1s")[0]
n1 = med("storm-nojitter-keepwire", "peak_attempts_per_sec_1s")[0]
j100 = med("storm-jitter-keepwire", "peak_attempts_per_sec_100ms")[0]
n100 = med("storm-nojitter-keepwire", "peak_attempts_per_sec_100ms")[0]
print(f"\njitter ÷ no jitter, peak attempts after the restart: {ratio(j1, n1)} (1 s windows), {ratio(j100, n100)} (100 ms windows)\n")


def timeline(name, title):
    """Attempts per 100 ms from the kill, first run with and without jitter."""
    series, restart = [], None
    for j, label in (("jitter", "full jitter"), ("nojitter", "no jitter")):
        rs = by.get(f"storm-{j}-keepwire", [])
        if rs:
            series.append((label, [(i / 10, v) for i, v in enumerate(rs[0]["attempts_per_100ms_from_kill"])]))
            restart = rs[0]["restart_at_secs"]
    lines(name, title, series, "seconds from the kill", "attempts per 100 ms", marker=(restart, "relay back"))




def bars(name, title, groups, unit):
    """groups: [(group label, [(series, value)])] -> grouped bar chart SVG."""
    colors = {"keepwire": "#2b6cb0", "node-ws": "#dd6b20", "python-ws": "#38a169", "socketio": "#805ad5", "mosquitto": "#d69e2e"}
    vals = [v for _, s in groups for _, v in s if v is not None]
    top = max(vals) if vals else 1
    w, h, left, bottom = 640, 320, 60, 40
    bw = 22
    gw = (w - left - 20) / max(len(groups), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w/2}" y="16" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{h-bottom}" x2="{w-10}" y2="{h-bottom}" stroke="black"/>']
    for i in range(5):
        v = top * i / 4
        y = h - bottom - (h - bottom - 30) * i / 4
        out.append(f'<text x="{left-5}" y="{y+4}" text-anchor="end">{v:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{y}" x2="{w-10}" y2="{y}" stroke="#ddd"/>')
    for gi, (g, series) in enumerate(groups):
        x0 = left + gi * gw + (gw - bw * len(series)) / 2
        for si, (s, v) in enumerate(series):
            if v is None:
                continue
            bh = (h - bottom - 30) * v / top
            x = x0 + si * bw
            out.append(f'<rect x="{x}" y="{h-bottom-bh}" width="{bw-2}" height="{bh}" fill="{colors.get(s, "#888")}"><title>{s}: {v:.3g} {unit}</title></rect>')
        out.append(f'<text x="{left + gi*gw + gw/2}" y="{h-bottom+15}" text-anchor="middle">{g}</text>')
    for si, s in enumerate(targets):
        out.append(f'<rect x="{left + si*110}" y="{h-14}" width="10" height="10" fill="{colors[s]}"/><text x="{left + si*110 + 14}" y="{h-5}">{s}</text>')
    out.append(f'<text x="12" y="{(h-bottom)/2}" transform="rotate(-90 12 {(h-bottom)/2})" text-anchor="middle">{unit}</text>')
    out.append("</svg>")
    open(os.path.join(outdir, name), "w").write("\n".join(out))


def lines(name, title, series, xlabel, ylabel, xlog=False, marker=None):
    """series: [(label, [(x, y)])] -> line chart SVG; marker: (x, text) or None."""
    import math
    colors = {"keepwire": "#2b6cb0", "node-ws": "#dd6b20", "python-ws": "#38a169", "socketio": "#805ad5", "mosquitto": "#d69e2e",
              "full jitter": "#2b6cb0", "no jitter": "#dd6b20"}
    series = [(l, pts) for l, pts in series if pts]
    if not series:
        return
    fx = (lambda v: math.log10(max(v, 0.01))) if xlog else (lambda v: v)
    xs = [fx(x) for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x0, x1, y1 = min(xs), max(xs), max(ys) or 1
    w, h, left, bottom = 720, 340, 70, 50
    X = lambda v: left + (w - left - 20) * (fx(v) - x0) / ((x1 - x0) or 1)
    Y = lambda v: h - bottom - (h - bottom - 30) * v / y1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w/2}" y="16" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{h-bottom}" x2="{w-10}" y2="{h-bottom}" stroke="black"/>']
    for i in range(5):
        v = y1 * i / 4
        out.append(f'<text x="{left-5}" y="{Y(v)+4}" text-anchor="end">{v:.3g}</text><line x1="{left}" y1="{Y(v)}" x2="{w-10}" y2="{Y(v)}" stroke="#ddd"/>')
    ticks = sorted({x for _, pts in series for x, _ in pts})
    if len(ticks) > 12:
        ticks = ticks[:: len(ticks) // 8]
    if xlog:
        ticks = [t for t in (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000) if 10 ** x0 <= t <= 10 ** x1]
    for t in ticks:
        out.append(f'<text x="{X(t)}" y="{h-bottom+14}" text-anchor="middle">{t:g}</text>')
    if marker and marker[0] is not None:
        out.append(f'<line x1="{X(marker[0])}" y1="30" x2="{X(marker[0])}" y2="{h-bottom}" stroke="#888" stroke-dasharray="4"/><text x="{X(marker[0])+4}" y="40">{marker[1]}</text>')
    for k, (label, pts) in enumerate(series):
        c = colors.get(label, "#888")
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        out.append(f'<rect x="{left + k*120}" y="{h-14}" width="10" height="10" fill="{c}"/><text x="{left + k*120 + 14}" y="{h-5}">{label}</text>')
    out.append(f'<text x="{w/2}" y="{h-bottom+30}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(h-bottom)/2}" transform="rotate(-90 14 {(h-bottom)/2})" text-anchor="middle">{ylabel}</text>')
    out.append("</svg>")
    open(os.path.join(outdir, name), "w").write("\n".join(out))


timeline("storm-attempts.svg", "Reconnect storm: connection attempts per 100 ms from the kill")
for load in ("27k", "55k"):
    lines(f"fanout-cdf-{load}.svg", f"Fanout latency distribution at {load} deliveries/s offered (first run of each target)",
          [(t, [(ms, p) for p, ms in (by.get(f"cdf-{load}-{t}") or by[f"fanout-{load}-{t}"])[0].get("distribution_ms", [])])
           for t in targets if by.get(f"cdf-{load}-{t}") or by.get(f"fanout-{load}-{t}")],
          "send-to-receipt latency, ms (log scale)", "percentile of deliveries", xlog=True)
sweep = collections.defaultdict(list)
for label, rs in by.items():
    if label.startswith("sweep-idle-"):
        _, _, n, t = label.split("-", 3)
        sweep[t].append((int(n), statistics.median(r["bytes_per_conn"] for r in rs)))
for t in targets:
    m = med(f"idle-{t}", "bytes_per_conn")[0]
    if m is not None and sweep.get(t):
        sweep[t].append((max(r["conns"] for r in by[f"idle-{t}"]), m))
lines("idle-memory-vs-connections.svg", "Server memory per idle connection against connections",
      [(t, sorted(sweep[t])) for t in targets], "open connections", "bytes per connection")
if sweep:
    print("\n### Memory per idle connection against connections (one run per size; 15,000: median of the suite)\n")
    sizes = sorted({n for pts in sweep.values() for n, _ in pts})
    print("| target | " + " | ".join(f"{n:,}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for t in targets:
        d = dict(sweep.get(t, []))
        print(f"| {t} | " + " | ".join(f"{d[n]:,.0f}" if n in d else "n/a" for n in sizes) + " |")
    print()

bars("fanout-latency.svg", "Fanout latency at equal offered load (median of runs)",
     [(f"{load} {p}", [(t, med(f"fanout-{load}-{t}", f"{p}_ms")[0]) for t in targets])
      for load in ("27k", "55k") for p in ("p50", "p99")], "ms")
bars("idle-memory.svg", "Server memory per idle connection",
     [("bytes/conn", [(t, med(f"idle-{t}", "bytes_per_conn")[0]) for t in targets])], "bytes")
print(f"Plots: {outdir}/fanout-latency.svg, {outdir}/fanout-cdf-27k.svg, {outdir}/fanout-cdf-55k.svg, {outdir}/idle-memory.svg, {outdir}/idle-memory-vs-connections.svg, {outdir}/storm-attempts.svg")
