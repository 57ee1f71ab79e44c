#!/usr/bin/env python3
"""Turns the VM console logs' RINGTUN-VM-* markers (see init.sh) into a host-side test result.

    report.py [--json OUT] [--markdown OUT] <name>=<console.log>[:<kernel config>] ...

Prints per kernel its release, what `ringtun probe --json` said inside (io_uring, driver,
kTLS TX/RX and ciphers), each test's pass/fail and host-side checks, then one
"N passed, N failed" line. Exits 1 if anything failed, including: the VM printed nothing
(did not boot), the DONE marker is missing, a test began and never finished, no tests ran,
the probe JSON is missing, or kTLS was available but a kTLS test skipped itself.
"""

import json
import re
import sys

MARK = re.compile(r"RINGTUN-VM-([A-Z-]+)(?: (.*))?$")
LOOPBACK = "data_plane::ktls::tests::ktls_loopback_moves_a_mebibyte_each_way"


def parse(path):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return {"error": f"cannot read {path}: {e}"}
    vm = {
        "release": None,
        "modules": {},
        "probe": None,
        "probe_error": None,
        "nouring_probe": None,
        "nouring_unsupported": None,
        "tests": [],  # (name, ok, detail)
        "tlsstat": {},
        "skipped_ktls": [],
        "done": None,
        "lines": 0,
    }
    current = None
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        vm["lines"] += 1
        # A marker may follow stray console output on the same line; take it from its start.
        at = line.find("RINGTUN-VM-")
        m = MARK.match(line[at:]) if at >= 0 else None
        if not m:
            if current is not None and "SKIPPED (no kTLS" in line:
                vm["skipped_ktls"].append((current, line.strip()))
            continue
        kind, rest = m.group(1), (m.group(2) or "")
        if kind == "KERNEL":
            vm["release"] = rest.strip()
        elif kind == "MODULE":
            name, _, status = rest.partition(" ")
            vm["modules"][name] = status
        elif kind in ("PROBE", "NOURING-PROBE"):
            key = "probe" if kind == "PROBE" else "nouring_probe"
            try:
                vm[key] = json.loads(rest)
            except ValueError as e:
                vm["probe_error"] = f"{kind}: unparsable JSON ({e}): {rest[:200]}"
        elif kind == "NOURING-UNSUPPORTED":
            vm["nouring_unsupported"] = rest
        elif kind == "BEGIN":
            if current is not None:
                vm["tests"].append((current, False, "began but never finished", "?"))
            current = rest.strip()
        elif kind == "RESULT":
            parts = rest.split()
            name = parts[0] if parts else "?"
            ok = len(parts) > 1 and parts[1] == "ok"
            detail = "" if ok else f"exit status {parts[2] if len(parts) > 2 else '?'}"
            secs = parts[3] if len(parts) > 3 else "?"
            vm["tests"].append((name, ok, detail, secs))
            current = None
        elif kind == "TLSSTAT":
            parts = rest.split()
            counters = {}
            for p in parts[1:]:
                k, _, v = p.partition("=+")
                try:
                    counters[k] = int(v)
                except ValueError:
                    pass
            vm["tlsstat"][parts[0] if parts else "?"] = counters
        elif kind == "DONE":
            vm["done"] = rest.strip()
    if current is not None:
        vm["tests"].append((current, False, "began but never finished (VM crashed or timed out)", "?"))
    return vm


def config_has_ktls(path):
    if not path:
        return None
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("CONFIG_TLS="):
                    return line.strip().split("=", 1)[1] in ("y", "m")
    except OSError:
        return None
    return False


def checks(vm, expect_ktls):
    """Host-side checks: (name, ok, detail)."""
    out = []
    if "error" in vm:
        return [("vm:log", False, vm["error"])]
    booted = vm["release"] is not None
    out.append(("vm:booted", booted, "" if booted else f"no RINGTUN-VM-KERNEL marker in {vm['lines']} console lines"))
    if not booted:
        return out
    done = vm["done"]
    out.append(("vm:done-marker", done is not None, "" if done is not None else "RINGTUN-VM-DONE missing (VM died or timed out)"))
    out.append(("vm:tests-ran", bool(vm["tests"]), "" if vm["tests"] else "no test results"))
    probe = vm["probe"]
    out.append(("vm:probe-json", probe is not None, vm["probe_error"] or ("" if probe else "no RINGTUN-VM-PROBE marker")))
    ktls = (probe or {}).get("ktls") or {}
    if expect_ktls:
        ok = bool(ktls.get("tx") and ktls.get("rx"))
        why = ktls.get("reason") if probe else "no probe output"
        out.append(("ktls:available", ok, "" if ok else
                    f"kernel config has CONFIG_TLS but kTLS TX/RX unavailable: {why} "
                    f"(modprobe tls: {vm['modules'].get('tls', 'not attempted')})"))
    if ktls.get("tx"):
        skipped = vm["skipped_ktls"]
        out.append(("ktls:no-skips", not skipped, "" if not skipped else
                    "; ".join(f"{t}: {line}" for t, line in skipped)))
        names = [t[0] for t in vm["tests"]]
        ran = LOOPBACK in names
        out.append(("ktls:loopback-ran", ran, "" if ran else f"{LOOPBACK} did not run"))
        if ran:
            stat = vm["tlsstat"].get(LOOPBACK, {})
            tx, rx = stat.get("TlsTxSw", 0), stat.get("TlsRxSw", 0)
            # The test process's own probe installs one zero-key TLS_TX/TLS_RX per accepted
            # cipher; the two tunnel ends add at least one more each way on top of that.
            need_tx = len(ktls.get("ciphers") or []) + 2
            need_rx = len(ktls.get("rx_ciphers") or []) + 2
            ok = tx >= need_tx and rx >= need_rx and stat.get("TlsDecryptError", 0) == 0
            out.append(("ktls:kernel-counters", ok,
                        f"/proc/net/tls_stat during the loopback test: {stat or 'no change'} "
                        f"(need TlsTxSw >= {need_tx}, TlsRxSw >= {need_rx}, no TlsDecryptError)"))
    nouring = vm["nouring_probe"]
    if nouring is not None:
        io = nouring.get("io_uring") or {}
        drv = nouring.get("driver") or {}
        ok = (io.get("available") is False and drv.get("selected") == "epoll"
              and bool(drv.get("reason")) and io.get("io_uring_disabled") == 2)
        out.append(("nouring:probe-says-epoll-and-why", ok,
                    f"io_uring.available={io.get('available')} io_uring_disabled={io.get('io_uring_disabled')} "
                    f"driver={drv.get('selected')} reason={drv.get('reason')!r} io_uring.reason={io.get('reason')!r}"))
    return out


def yn(v):
    return "yes" if v is True else "no" if v is False else "?"


def summary_row(name, vm, passed, failed):
    p = vm.get("probe") or {}
    k = p.get("ktls") or {}
    io = p.get("io_uring") or {}
    nr = vm.get("nouring_probe")
    if nr:
        nouring = f"{(nr.get('driver') or {}).get('selected')}: {(nr.get('driver') or {}).get('reason')}"
    elif vm.get("nouring_unsupported"):
        nouring = "n/a (no sysctl)"
    else:
        nouring = "not run"
    return {
        "kernel": name,
        "release": vm.get("release") or "did not boot",
        "io_uring": yn(io.get("available")),
        "driver": (p.get("driver") or {}).get("selected", "?"),
        "splice": yn((p.get("splice") or {}).get("available")),
        "ktls_tx": yn(k.get("tx")),
        "ktls_rx": yn(k.get("rx")),
        "tx_ciphers": ", ".join(k.get("ciphers") or []) or "-",
        "rx_ciphers": ", ".join(k.get("rx_ciphers") or []) or "-",
        "rekey": k.get("rekey", "?"),
        "io_uring_disabled_2": nouring,
        "passed": passed,
        "failed": failed,
    }


def main(argv):
    json_out = md_out = None
    args = []
    i = 0
    while i < len(argv):
        if argv[i] == "--json":
            json_out = argv[i + 1]
            i += 2
        elif argv[i] == "--markdown":
            md_out = argv[i + 1]
            i += 2
        else:
            args.append(argv[i])
            i += 1
    if not args:
        print("report.py: no kernels given", file=sys.stderr)
        return 1
    total_p = total_f = 0
    rows = []
    for arg in args:
        name, _, rest = arg.partition("=")
        log, _, config = rest.partition(":")
        vm = parse(log)
        expect = config_has_ktls(config)
        results = [(n, ok, d, s) for n, ok, d, s in vm.get("tests", [])]
        results += [(n, ok, d, "-") for n, ok, d in checks(vm, expect)]
        p = sum(1 for r in results if r[1])
        f = len(results) - p
        total_p += p
        total_f += f
        probe = vm.get("probe") or {}
        k = probe.get("ktls") or {}
        print(f"== {name}: {vm.get('release') or 'DID NOT BOOT'}  (console log: {log})")
        if probe:
            io = probe.get("io_uring") or {}
            drv = probe.get("driver") or {}
            print(f"   io_uring: {yn(io.get('available'))}; driver: {drv.get('selected')} ({drv.get('reason')})")
            print(f"   kTLS TX: {yn(k.get('tx'))} [{', '.join(k.get('ciphers') or [])}]  "
                  f"RX: {yn(k.get('rx'))} [{', '.join(k.get('rx_ciphers') or [])}]  rekey: {k.get('rekey')}"
                  + (f"  reason: {k.get('reason')}" if k.get("reason") else ""))
        if vm.get("modules"):
            bad = {m: s for m, s in vm["modules"].items() if not s.startswith("ok")}
            print(f"   modules loaded: {len(vm['modules']) - len(bad)}/{len(vm['modules'])}"
                  + (f"; failed: {bad}" if bad else ""))
        for n, ok, d, s in results:
            secs = f" ({s} s)" if s not in ("-", "?") else ""
            print(f"   {'ok    ' if ok else 'FAILED'} {n}{secs}" + (f" — {d}" if d and (not ok or n.startswith(('ktls:', 'nouring:'))) else ""))
        print(f"   {name}: {p} passed, {f} failed")
        row = summary_row(name, vm, p, f)
        row["results"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d, _ in results]
        rows.append(row)
    print(f"kernel matrix: {total_p} passed, {total_f} failed")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)
    if md_out:
        with open(md_out, "w") as f:
            f.write("| kernel | release | io_uring | driver | splice | kTLS TX | kTLS RX | ciphers (TX = RX) | rekey "
                    "| with io_uring_disabled=2 | tests + checks |\n")
            f.write("|---|---|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                ciphers = r["tx_ciphers"] if r["tx_ciphers"] == r["rx_ciphers"] else \
                    f"TX {r['tx_ciphers']}; RX {r['rx_ciphers']}"
                f.write(f"| {r['kernel']} | {r['release']} | {r['io_uring']} | {r['driver']} | {r['splice']} "
                        f"| {r['ktls_tx']} | {r['ktls_rx']} | {ciphers} | {r['rekey']} "
                        f"| {r['io_uring_disabled_2']} | {r['passed']} passed, {r['failed']} failed |\n")
    return 0 if total_f == 0 and total_p > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
