#!/usr/bin/env python3
"""The report of one perf/run: reads the results CSV that perf/compare.sh and perf/hbone.sh wrote
(suite,row,round,test,param,metric,value) and the idle-flow CSV (tests/idle_flows.rs), takes the
median over rounds of every figure, and writes

  - report.md: the issue-12 table (ringtun against its bar, as ratios) and one table per test;
  - PNG charts (matplotlib): throughput, connection rate, open-loop latency, scaling, idle flows.

It prints the summary table to stdout. Nothing here measures; see perf/README.md.

    perf/tools/perf_report.py <run dir>      # reads <run dir>/results.csv and idle.csv
"""
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Row names as the suites use them, and how the report names them.
LABEL = {
    "direct": "direct",
    "ringtun-uring": "ringtun",
    "haproxy": "HAProxy",
    "socat": "socat",
    "ringtun-epoll": "ringtun (epoll)",
    "h2-baseline": "h2 tunnel",
    "ringtun-hbone": "ringtun HBONE",
}
PLAIN_RINGTUN, HBONE_RINGTUN = "ringtun-uring", "ringtun-hbone"
COLOURS = {
    "direct": "#7f7f7f",
    "ringtun-uring": "#1f77b4",
    "ringtun-epoll": "#17becf",
    "haproxy": "#ff7f0e",
    "socat": "#bcbd22",
    "h2-baseline": "#d62728",
    "ringtun-hbone": "#2ca02c",
}


class Results:
    """Per-round values: values[(suite, row, test, param, metric)] = {round: value}."""

    def __init__(self, path):
        self.values = defaultdict(dict)
        self.order = defaultdict(list)  # suite -> rows in first-seen order
        with open(path, newline="") as f:
            for rec in csv.reader(f):
                if len(rec) != 7:
                    continue
                suite, row, rnd, test, param, metric, value = rec
                try:
                    v = float(value)
                except ValueError:
                    continue
                self.values[(suite, row, test, param, metric)][rnd] = v
                if row not in self.order[suite]:
                    self.order[suite].append(row)

    def median(self, suite, row, test, param, metric):
        v = self.values.get((suite, row, test, param, metric))
        return statistics.median(v.values()) if v else None

    def per_round(self, suite, row, test, param, metric):
        return self.values.get((suite, row, test, param, metric), {})

    def params(self, suite, test):
        ps = {k[3] for k in self.values if k[0] == suite and k[2] == test}
        return sorted(ps, key=sort_key)

    def rounds(self):
        return sorted({r for v in self.values.values() for r in v}, key=sort_key)

    def cpu_per(self, suite, row, test, params, amount_metric, scale):
        """Median over rounds of CPU seconds per `scale` units of `amount_metric`, summed over
        `params` within a round (e.g. CPU-s per GB over every iperf3 test of the round)."""
        per = []
        for rnd in self.rounds():
            cpu = amount = 0.0
            for p in params:
                c = self.per_round(suite, row, test, p, "cpu_s").get(rnd)
                a = self.per_round(suite, row, test, p, amount_metric).get(rnd)
                if c is not None and a is not None:
                    cpu, amount = cpu + c, amount + a
            if amount > 0:
                per.append(cpu / (amount / scale))
        return statistics.median(per) if per else None


def sort_key(p):
    head = p.split("-")[0]
    try:
        return (0, float(head), p)
    except ValueError:
        return (1, 0.0, p)


def fmt(v, digits=2):
    return "–" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def idle_table(path):
    """idle[(kind, flows, node)] = (KiB per flow, descriptors per flow)."""
    idle = {}
    if path.exists():
        with open(path, newline="") as f:
            for rec in csv.DictReader(f):
                idle[(rec["kind"], int(rec["flows"]), rec["node"])] = (
                    float(rec["rss_kib_per_flow"]),
                    float(rec["fds_per_flow"]),
                )
    return idle


def summary(res, idle):
    """The issue-12 table: (measure, ringtun now, the bar, met?)."""
    rows = []

    def add(measure, now, bar, met):
        rows.append((measure, now, bar, "–" if met is None else ("yes" if met else "no")))

    for kind, bar in (("plain", 2.0), ("hbone", 4.0)):
        for flows in sorted({k[1] for k in idle if k[0] == kind}):
            a = idle.get((kind, flows, "A"))
            b = idle.get((kind, flows, "B"))
            worst = max(x[0] for x in (a, b) if x) if (a or b) else None
            fds = a[1] if a else None
            add(
                f"idle {kind} flow at {flows:,}: KiB per flow (worst node), descriptors",
                f"{fmt(worst)} KiB, {fmt(fds)} fds",
                f"≤ {bar:g} KiB",
                None if worst is None else worst <= bar,
            )
    for test in ("fwd-P1", "rev-P1", "fwd-P4", "rev-P4"):
        r = ratio(
            res.median("hbone", HBONE_RINGTUN, "iperf3", test, "gbps"),
            res.median("hbone", "h2-baseline", "iperf3", test, "gbps"),
        )
        if r is not None:
            add(f"HBONE throughput {test} × h2 tunnel", fmt(r), "≥ 1.5", r >= 1.5)
    ip = res.params("hbone", "iperf3")
    r = ratio(
        res.cpu_per("hbone", HBONE_RINGTUN, "iperf3", ip, "bytes", 1e9),
        res.cpu_per("hbone", "h2-baseline", "iperf3", ip, "bytes", 1e9),
    )
    if r is not None:
        add("HBONE CPU per GB × h2 tunnel", fmt(r), "≤ 0.6", r <= 0.6)
    for c in res.params("hbone", "rate"):
        r = ratio(
            res.median("hbone", HBONE_RINGTUN, "rate", c, "conns_per_sec"),
            res.median("hbone", "h2-baseline", "rate", c, "conns_per_sec"),
        )
        if r is not None:
            add(f"HBONE connections/s at {c} concurrent × h2 tunnel", fmt(r), "≥ 1.5", r >= 1.5)
    for test in ("fwd-P1", "rev-P1"):
        r = ratio(
            res.median("plain", PLAIN_RINGTUN, "iperf3", test, "gbps"),
            res.median("plain", "direct", "iperf3", test, "gbps"),
        )
        if r is not None:
            add(f"plain TCP {test} × direct", fmt(r), "≥ 0.85", r >= 0.85)
    wrk = res.params("plain", "wrk")
    for c in wrk:
        d = res.median("plain", "direct", "wrk", c, "req_per_sec")
        rt = ratio(res.median("plain", PLAIN_RINGTUN, "wrk", c, "req_per_sec"), d)
        ha = ratio(res.median("plain", "haproxy", "wrk", c, "req_per_sec"), d)
        rt_cpu = res.cpu_per("plain", PLAIN_RINGTUN, "wrk", [c], "requests", 1e6)
        ha_cpu = res.cpu_per("plain", "haproxy", "wrk", [c], "requests", 1e6)
        if rt is not None:
            add(
                f"plain small requests (wrk {c}) × direct; CPU µs/request",
                f"{fmt(rt)} (HAProxy {fmt(ha)}); {fmt(rt_cpu, 1)} µs (HAProxy {fmt(ha_cpu, 1)})",
                "ahead of HAProxy at lower CPU",
                None if ha is None or rt_cpu is None or ha_cpu is None
                else rt > ha and rt_cpu < ha_cpu,
            )
    for c in res.params("plain", "rate"):
        rt = res.median("plain", PLAIN_RINGTUN, "rate", c, "conns_per_sec")
        ha = res.median("plain", "haproxy", "rate", c, "conns_per_sec")
        r = ratio(rt, res.median("plain", "direct", "rate", c, "conns_per_sec"))
        if r is not None:
            add(f"plain connections/s at {c} concurrent × direct", f"{fmt(r)} (HAProxy {fmt(ratio(ha, res.median('plain', 'direct', 'rate', c, 'conns_per_sec')))})", "–", None)
    for suite, ringtun, bar in (("plain", PLAIN_RINGTUN, 25), ("hbone", HBONE_RINGTUN, 50)):
        for rate in res.params(suite, "open-loop"):
            d = res.median(suite, "direct", "open-loop", rate, "p50_us")
            t = res.median(suite, ringtun, "open-loop", rate, "p50_us")
            if d is not None and t is not None:
                add(
                    f"{suite} 1 KiB request/response at {float(rate):,.0f}/s: p50 added over direct",
                    f"+{t - d:,.0f} µs",
                    f"≤ +{bar} µs",
                    t - d <= bar,
                )
    return rows


def markdown_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def detail_tables(res):
    """One table per suite and test: every row's median for each param, and the first figure's
    ratio to direct (for latency: how many times direct's)."""
    shown = {
        "iperf3": [("gbps", "Gbit/s", 2)],
        "wrk": [("req_per_sec", "req/s", 0)],
        "rate": [("conns_per_sec", "conns/s", 0)],
        "latency": [("p50_us", "p50 µs", 1), ("p99_us", "p99 µs", 1)],
        "open-loop": [
            ("p50_us", "p50 µs", 0),
            ("p99_us", "p99 µs", 0),
            ("p999_us", "p99.9 µs", 0),
            ("achieved_rate", "achieved/s", 0),
        ],
        "bulk": [("gbit_per_sec", "Gbit/s", 2)],
    }
    amount = {"iperf3": ("bytes", 1e9, "CPU-s/GB"), "bulk": ("bytes_received", 1e9, "CPU-s/GB"),
              "rate": ("conns", 1e3, "CPU-s/1000 conns"), "wrk": ("requests", 1e6, "CPU µs/req")}
    parts = []
    for suite in ("plain", "hbone"):
        for test, metrics in shown.items():
            params = res.params(suite, test)
            if not params:
                continue
            header = ["row", "param"] + [m[1] for m in metrics] + ["× direct"]
            if test in amount:
                header.append(amount[test][2])
            rows = []
            for p in params:
                base = res.median(suite, "direct", test, p, metrics[0][0])
                for row in res.order[suite]:
                    first = res.median(suite, row, test, p, metrics[0][0])
                    if first is None:
                        continue
                    cells = [LABEL.get(row, row), p]
                    cells += [fmt(res.median(suite, row, test, p, m), d) for m, _, d in metrics]
                    cells.append(fmt(ratio(first, base)))
                    if test in amount:
                        a, scale, _ = amount[test]
                        cells.append(fmt(res.cpu_per(suite, row, test, [p], a, scale), 3))
                    rows.append(cells)
            parts.append(f"### {suite}: {test}\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def charts(res, idle, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # Throughput: grouped bars per suite.
    suites = [s for s in ("plain", "hbone") if res.params(s, "iperf3")]
    if suites:
        fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            params = res.params(suite, "iperf3")
            rows = [r for r in res.order[suite] if res.median(suite, r, "iperf3", params[0], "gbps") is not None]
            width = 0.8 / max(len(rows), 1)
            for i, row in enumerate(rows):
                ys = [res.median(suite, row, "iperf3", p, "gbps") or 0 for p in params]
                xs = [j + i * width for j in range(len(params))]
                ax.bar(xs, ys, width, label=LABEL.get(row, row), color=COLOURS.get(row))
            ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(params))], params)
            ax.set_ylabel("Gbit/s (median)")
            ax.set_title(f"{suite}: iperf3 throughput")
            ax.legend(fontsize=8)
        save(fig, "throughput.png")

    def lines(test, metric, ylabel, title, name, logx=False, logy=False):
        suites = [s for s in ("plain", "hbone") if res.params(s, test)]
        if not suites:
            return
        fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            params = res.params(suite, test)
            xs = [float(p) for p in params]
            for row in res.order[suite]:
                ys = [res.median(suite, row, test, p, metric) for p in params]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABEL.get(row, row), color=COLOURS.get(row))
            if logx:
                ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{suite}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, name)

    lines("rate", "conns_per_sec", "connections/s", "new connections vs concurrent clients",
          "conn_rate.png", logx=True)
    for q, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        lines("open-loop", q, f"{label} latency µs (log)", f"open-loop 1 KiB exchanges, {label}",
              f"latency_{label.replace('.', '')}.png", logy=True)
    lines("bulk", "gbit_per_sec", "Gbit/s", "throughput vs concurrent bulk flows",
          "scaling_throughput.png", logx=True)

    # CPU per GB vs flows.
    suites = [s for s in ("plain", "hbone") if res.params(s, "bulk")]
    if suites:
        fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            params = res.params(suite, "bulk")
            for row in res.order[suite]:
                if row == "direct":
                    continue
                pts = [(float(p), res.cpu_per(suite, row, "bulk", [p], "bytes_received", 1e9)) for p in params]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABEL.get(row, row), color=COLOURS.get(row))
            ax.set_xscale("log")
            ax.set_ylabel("proxy CPU-s per GB")
            ax.set_title(f"{suite}: CPU per GB vs concurrent bulk flows")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "scaling_cpu.png")

    if idle:
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = sorted({(k[0], k[1]) for k in idle})
        for i, node in enumerate(("A", "B")):
            ys = [idle.get((k, n, node), (0, 0))[0] for k, n in keys]
            ax.bar([j + i * 0.4 for j in range(len(keys))], ys, 0.4, label=f"node {node}")
        ax.set_xticks([j + 0.2 for j in range(len(keys))], [f"{k} {n:,}" for k, n in keys])
        ax.axhline(2, color="#1f77b4", ls="--", lw=0.8)
        ax.axhline(4, color="#2ca02c", ls="--", lw=0.8)
        ax.set_ylabel("resident KiB per idle flow")
        ax.set_title("idle flows (bars: 2 KiB plain, 4 KiB HBONE)")
        ax.legend(fontsize=8)
        save(fig, "idle.png")
    return written


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    res = Results(out / "results.csv")
    idle = idle_table(out / "idle.csv")
    table = summary(res, idle)
    header = ["measure", "ringtun", "the bar", "met"]
    report = ["## Summary (medians of " + str(len(res.rounds())) + " round(s))", "",
              markdown_table(header, table), "", "## Every test", "", detail_tables(res)]
    try:
        pngs = charts(res, idle, out)
    except ImportError:
        pngs = []
        print("perf_report: matplotlib missing (apt-get install python3-matplotlib): no charts",
              file=sys.stderr)
    if pngs:
        report += ["", "## Charts", ""] + [f"![{p}]({p})" for p in pngs]
    (out / "report.md").write_text("\n".join(report) + "\n")
    width = max((len(r[0]) for r in table), default=10)
    for r in table:
        print(f"{r[0]:<{width}}  {r[1]:<34} {r[2]:<30} {r[3]}")
    print(f"\nreport: {out / 'report.md'}; charts: {', '.join(pngs) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
