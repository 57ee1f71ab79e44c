#!/usr/bin/env bash
# perf/reload.sh — what a configuration reload at mesh scale costs the data path.
#
# Starts one ringtun node (pod mode, io_uring) whose file holds 10,000 workloads and 10,000
# authorization policies, keeps a few hundred plaintext flows open through its inbound capture
# (client namespace → server pod, TPROXY to 15006, every flow decided by those policies), each
# exchanging a small checked request/response at a steady pace, and reloads the file N times
# (a changed policy set written, then SIGHUP). Reports per reload: the reload's applied-in time
# (control thread, `/config_dump`), each reactor's adoption of the new snapshot (the
# `ringtun_reactor_snapshot_adoption_seconds` histogram: one sample per reactor per reload), the
# worst round-trip around it; and the round-trips of a quiet phase against the reload phase.
# Prints a table and writes a CSV (per reload) and a markdown summary to perf/results/.
# Needs root. See perf/README.md for what the numbers mean. A benchmark, not a test.
#
# Environment (all optional):
#   PERF_WORKLOADS=10000 PERF_POLICIES=10000   mesh size (one workload is local: the server pod)
#   PERF_FLOWS=400          open flows, client → server pod, through ringtun
#   PERF_INTERVAL_MS=40     each flow sends one request every this many milliseconds
#   PERF_BYTES=64           bytes per request (echoed back and checked)
#   PERF_QUIET_SECS=8       the quiet phase (no reload) before the reloads
#   PERF_RELOADS=5          reloads, each PERF_RELOAD_GAP_SECS after the previous was applied
#   PERF_RELOAD_GAP_SECS=2
#   PERF_REACTORS=<nproc>   ringtun --reactors
#   PERF_DRIVER=io-uring    ringtun --driver (io-uring or epoll)
#   PERF_NO_BUILD=0         1: use the existing target/release/{ringtun,tcp-load}
#   PERF_KEEP_LOGS=0        1: keep the scratch directory (configs, ringtun log, metrics)
set -Eeuo pipefail

WORKLOADS=${PERF_WORKLOADS:-10000}
POLICIES=${PERF_POLICIES:-10000}
FLOWS=${PERF_FLOWS:-400}
INTERVAL_MS=${PERF_INTERVAL_MS:-40}
BYTES=${PERF_BYTES:-64}
QUIET_SECS=${PERF_QUIET_SECS:-8}
RELOADS=${PERF_RELOADS:-5}
GAP_SECS=${PERF_RELOAD_GAP_SECS:-2}
REACTORS=${PERF_REACTORS:-$(nproc)}
DRIVER=${PERF_DRIVER:-io-uring}
NO_BUILD=${PERF_NO_BUILD:-0}
KEEP=${PERF_KEEP_LOGS:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

PREFIX="rtrl$$"
NODE="$PREFIX-node"
CLI="$PREFIX-cli"
SRV="$PREFIX-srv"
CLI_IP=10.77.1.2
SRV_IP=10.77.4.2
ECHO_PORT=7000
METRICS=127.0.0.1:15020 # ringtun's endpoints, inside the node namespace
ADMIN=127.0.0.1:15000
READY=127.0.0.1:15021

TMP=""
PIDS=()
NSES=()
RINGTUN_PID=""

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'reload.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "reload.sh: failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- cleanup (always runs)
stop_pid() { # SIGTERM a process we started, wait up to 10 s, then SIGKILL
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM for 10 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid i
    set +e
    trap - ERR
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    for ((i = ${#NSES[@]} - 1; i >= 0; i--)); do
        ip netns del "${NSES[$i]}" 2>/dev/null || log "could not delete namespace ${NSES[$i]}"
    done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $rc -eq 0 && $KEEP != 1 ]]; then rm -rf "$TMP"; else log "logs kept in $TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools and knobs
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, iptables); run: sudo $0"
for cmd in cargo ip ss iptables curl jq python3; do
    command -v "$cmd" >/dev/null 2>&1 || die "required tool '$cmd' is missing; install it"
done
for v in WORKLOADS POLICIES FLOWS INTERVAL_MS BYTES QUIET_SECS RELOADS GAP_SECS REACTORS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "PERF_$v must be a positive integer (got '${!v}')"
done
[[ $DRIVER == io-uring || $DRIVER == epoll ]] || die "PERF_DRIVER must be io-uring or epoll"
# Each flow holds two sockets and up to two pipes in ringtun; the client and echo server hold
# more. The process limit here is 20,000 descriptors.
((FLOWS <= 2000)) || die "PERF_FLOWS above 2000 would exceed the descriptor budget"

TMP=$(mktemp -d /tmp/ringtun-reload.XXXXXX)
STAMP=$(date +%Y-%m-%dT%H%M%S)
GITREV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

# ---------------------------------------------------------------- build
if [[ $NO_BUILD != 1 ]]; then
    log "cargo build --release (ringtun, tcp-load)"
    (cd "$REPO" && cargo build --release -p ringtun -p ringtun-perf-tools --bin ringtun --bin tcp-load) \
        >"$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log" >&2; die "cargo build --release failed"; }
fi
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory) \
    || die "cargo metadata failed"
RINGTUN="$TARGET_DIR/release/ringtun"
TCP_LOAD="$TARGET_DIR/release/tcp-load"
[[ -x $RINGTUN && -x $TCP_LOAD ]] || die "no release ringtun/tcp-load in $TARGET_DIR (build them, or unset PERF_NO_BUILD)"

# ---------------------------------------------------------------- helpers
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

LAST_PID=""
start_bg() { # start_bg <name> <netns> <cmd...>: background process in a namespace, logged
    local name=$1 ns=$2
    shift 2
    ip netns exec "$ns" "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_listen() { # wait_listen <netns> <port> <pid>: until a TCP listener exists
    local ns=$1 port=$2 pid=$3 i
    for i in $(seq 200); do
        if nsx "$ns" ss -Hltn "sport = :$port" | grep -q .; then return 0; fi
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before listening on :$port in $ns"
        sleep 0.05
    done
    die "nothing listens on :$port in $ns after 10 s"
}

add_ns() {
    ip netns add "$1" || die "ip netns add $1 failed"
    NSES+=("$1")
    ip -n "$1" link set lo up
}

# ---------------------------------------------------------------- topology
# client ns 10.77.1.2 ── veth ── node ns (router, ringtun) ── veth ── server pod ns 10.77.4.2
log "namespaces: $NODE (router, ringtun) $CLI ($CLI_IP) $SRV ($SRV_IP)"
add_ns "$NODE"
nsx "$NODE" sysctl -qw net.ipv4.ip_forward=1
for pair in "$CLI:1" "$SRV:4"; do
    ns=${pair%:*} i=${pair##*:}
    add_ns "$ns"
    ip -n "$NODE" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$NODE" addr add "10.77.$i.1/24" dev "v$i"
    ip -n "$NODE" link set "v$i" up
    ip -n "$ns" addr add "10.77.$i.2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "10.77.$i.1"
done

# ---------------------------------------------------------------- the mesh: two policy sets
# The mix of benches/policy.rs (200 namespaces, labels app0…app9; per namespace ALLOW by
# principal, namespace-wide ALLOW and DENY, AUDIT; one in a thousand mesh-wide DENY), with one
# local workload, the server pod (ns0, app0), and one ALLOW policy that admits the client's
# address block to the echo port. Set B differs from set A in every policy (ports, blocks), so a
# reload from one to the other recompiles everything; both allow the test flows.
cat >"$TMP/gen.py" <<'EOF'
import ipaddress, sys
workloads, policies, variant, srv_ip, srv_netns, port, out = sys.argv[1:]
workloads, policies, variant, port = int(workloads), int(policies), int(variant), int(port)
NS, APPS, SAS = 200, 10, 10
base = int(ipaddress.IPv4Address("10.64.0.1"))
y = ["version: 1", "node:", "  name: perf-node", "  admin: 127.0.0.1:15000",
     "  metrics: 127.0.0.1:15020", "  readiness: 127.0.0.1:15021", "workloads:",
     f"  - {{name: server, namespace: ns0, service_account: sa0, ips: [{srv_ip}], node: perf-node,"
     f" protocol: TCP, netns: {srv_netns}, labels: {{app: app0}}}}"]
for i in range(1, workloads):
    y.append(f"  - {{name: w{i}, namespace: ns{i % NS}, service_account: sa{i % SAS}, "
             f"ips: [{ipaddress.IPv4Address(base + i)}], node: other-node, labels: {{app: app{(i // NS) % APPS}}}}}")
y.append("policies:")
y.append(f"  - {{name: perf-clients, namespace: ns0, selector: {{match_labels: {{app: app0}}}}, rules: "
         f"[{{from: [{{source: {{ip_blocks: [10.77.1.0/24]}}}}], to: [{{operation: {{ports: [{port}]}}}}]}}]}}")
p1, p2 = (8080, 9090) if variant == 0 else (8081, 9091)
for j in range(policies - 1):
    ns, k = j % NS, j // NS
    other = lambda d: (ns + d) % NS
    if policies >= 1000 and j % 1000 == 999:
        y.append(f"  - {{name: mesh{j}, namespace: istio-system, action: DENY, rules: [{{from: [{{source: "
                 f"{{ip_blocks: [192.168.{(j // 1000 + variant) % 256}.0/24]}}}}]}}]}}")
    elif k % 20 == 0:
        y.append(f"  - {{name: p{j}, namespace: ns{ns}, rules: [{{from: [{{source: {{namespaces: "
                 f"[ns{other(1)}, ns{other(2)}]}}}}], to: [{{operation: {{ports: [{p1}, {p2}]}}}}]}}]}}")
    elif k % 20 == 1:
        y.append(f"  - {{name: p{j}, namespace: ns{ns}, action: DENY, rules: [{{from: [{{source: {{ip_blocks: "
                 f"[172.16.{(j + variant) % 256}.0/24]}}}}]}}, {{from: [{{source: {{principals: "
                 f"[cluster.local/ns/ns{other(3)}/sa/banned]}}}}]}}]}}")
    elif k % 20 == 2:
        y.append(f"  - {{name: p{j}, namespace: ns{ns}, action: AUDIT, selector: {{match_labels: "
                 f"{{app: app{k % APPS}}}}}, rules: [{{to: [{{operation: {{ports: [{9901 + variant}]}}}}]}}]}}")
    else:
        y.append(f"  - {{name: p{j}, namespace: ns{ns}, selector: {{match_labels: {{app: app{k % APPS}}}}}, "
                 f"rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns{other(1)}/sa/sa{j % SAS}, "
                 f"cluster.local/ns/ns{ns}/sa/sa{(j + 3) % SAS}, 'cluster.local/ns/ns{other(4)}/*']}}}}], "
                 f"to: [{{operation: {{ports: [{p1}, {p2}]}}}}]}}]}}")
open(out, "w").write("\n".join(y) + "\n")
EOF
for v in 0 1; do
    python3 "$TMP/gen.py" "$WORKLOADS" "$POLICIES" "$v" "$SRV_IP" "/var/run/netns/$SRV" "$ECHO_PORT" "$TMP/set$v.yaml"
    "$RINGTUN" check-config "$TMP/set$v.yaml" >"$TMP/check$v.log" 2>&1 \
        || { tail -20 "$TMP/check$v.log" >&2; die "generated configuration $TMP/set$v.yaml is invalid"; }
done
CFG="$TMP/node.yaml"
cp "$TMP/set0.yaml" "$CFG"
log "configuration: $WORKLOADS workloads, $POLICIES policies, $(du -h "$CFG" | cut -f1)"

# ---------------------------------------------------------------- server, capture, ringtun
start_bg echo "$SRV" "$TCP_LOAD" echo --listen "0.0.0.0:$ECHO_PORT" --threads 1
wait_listen "$SRV" "$ECHO_PORT" "$LAST_PID"
"$RINGTUN" redirect install --netns "$SRV" --config "$CFG" >"$TMP/redirect-install.log" 2>&1 \
    || { cat "$TMP/redirect-install.log" >&2; die "ringtun redirect install failed"; }
start_bg ringtun "$NODE" "$RINGTUN" run --config "$CFG" --driver "$DRIVER" --reactors "$REACTORS"
RINGTUN_PID=$LAST_PID
ok=0
for i in $(seq 600); do
    if nsx "$NODE" curl -sf -o /dev/null "http://$READY/healthz/ready"; then ok=1; break; fi
    kill -0 "$RINGTUN_PID" 2>/dev/null || { tail -20 "$TMP/ringtun.log" >&2; die "ringtun exited during startup"; }
    sleep 0.05
done
[[ $ok == 1 ]] || die "ringtun not ready after 30 s (log: $TMP/ringtun.log)"
[[ $(cat "/proc/$RINGTUN_PID/comm") == ringtun ]] || die "pid $RINGTUN_PID is not ringtun"

# ---------------------------------------------------------------- load and reloads
# The driver runs in the client namespace: FLOWS asyncio connections, each sending BYTES every
# INTERVAL_MS (its own schedule, not after the previous answer) and checking the echo; it
# reloads ringtun (file swapped by rename, then SIGHUP) and reads the node's metrics and
# /config_dump through `ip netns exec` into the node namespace.
cat >"$TMP/drive.py" <<'EOF'
import asyncio, json, os, re, shutil, signal, subprocess, sys, time

(target, port, flows, interval_ms, nbytes, quiet, reloads, gap, pid, cfg, set0, set1,
 node_ns, metrics_url, admin_url, csv_out, json_out) = sys.argv[1:]
port, flows, nbytes, reloads = int(port), int(flows), int(nbytes), int(reloads)
interval, quiet, gap, pid = int(interval_ms) / 1000, float(quiet), float(gap), int(pid)

samples = []          # (start time, round-trip seconds)
errors = []           # (time, flow, what)

async def fetch(url, jq_filter=None):
    # A child process, awaited: the flows keep their schedule while it runs. /config_dump
    # holds the whole effective configuration (megabytes at this size): jq picks the part
    # wanted outside this process.
    cmd = f"curl -sf '{url}'" + (f" | jq -c '{jq_filter}'" if jq_filter else "")
    p = await asyncio.create_subprocess_exec("ip", "netns", "exec", node_ns, "sh", "-c", cmd,
                                             stdout=subprocess.PIPE)
    out, _ = await p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"cannot read {url}: exit {p.returncode}")
    return out.decode()

async def scrape():
    m = {}
    for line in (await fetch(metrics_url)).splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        m[name] = float(value)
    return m

def per_reactor(m, name):
    out = {}
    for k, v in m.items():
        r = re.fullmatch(re.escape(name) + r'\{reactor="(\d+)"\}', k)
        if r:
            out[int(r.group(1))] = v
    return out

def sched():
    # Per ringtun thread (by name): CPU time and time spent runnable but waiting for a CPU,
    # nanoseconds (/proc/<pid>/task/<tid>/schedstat). A reactor waiting for a CPU is stalled
    # by the machine, not by its own work; this tells the two apart.
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            cpu, wait, _ = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
        except OSError:
            continue
        # Reactor threads are named reactor-N; every other thread (the main thread, where
        # reloads run, the file watcher, the endpoints) is the control side.
        kind = "reactor" if name.startswith("reactor") else "control"
        c, w = out.get(kind, (0, 0))
        out[kind] = (c + int(cpu), w + int(wait))
    return out

def sched_delta(a, b, kind):
    return tuple((b.get(kind, (0, 0))[i] - a.get(kind, (0, 0))[i]) / 1e6 for i in (0, 1))

async def reload_status():
    return json.loads(await fetch(admin_url, ".reload"))

async def flow(i, stop):
    try:
        reader, writer = await asyncio.open_connection(target, port)
    except OSError as e:
        errors.append((time.monotonic(), i, f"connect: {e}"))
        return
    seq = 0
    # Spread the flows over one interval so requests arrive evenly.
    next_at = time.monotonic() + interval * i / flows
    try:
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += interval
            msg = (f"{i}:{seq}:".encode() + b"x" * nbytes)[:nbytes]
            seq += 1
            t0 = time.monotonic()
            writer.write(msg)
            back = await reader.readexactly(len(msg))
            samples.append((t0, time.monotonic() - t0))
            if back != msg:
                errors.append((time.monotonic(), i, "echo differs"))
                return
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append((time.monotonic(), i, f"exchange: {e!r}"))
    finally:
        writer.close()

def window(a, b):
    return sorted(rtt for t, rtt in samples if a <= t < b)

def pct(v, p):
    if not v:
        return float("nan")
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]

async def main():
    stop = asyncio.Event()
    tasks = [asyncio.create_task(flow(i, stop)) for i in range(flows)]
    await asyncio.sleep(2)  # every flow connected and on its schedule
    connected = flows - len([e for e in errors if e[2].startswith("connect")])
    m0 = await scrape()
    s_q0 = sched()
    q0 = time.monotonic()
    await asyncio.sleep(quiet)
    q1 = time.monotonic()
    s_q1 = sched()
    m_quiet = await scrape()
    rows = []
    gen = int(m_quiet["ringtun_config_generation"])
    for n in range(reloads):
        before = await scrape()
        s_before = sched()
        src = set1 if n % 2 == 0 else set0
        shutil.copyfile(src, cfg + ".tmp")
        os.rename(cfg + ".tmp", cfg)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGHUP)
        while True:
            m = await scrape()
            if m["ringtun_config_generation"] > gen:
                break
            if time.monotonic() - t0 > 30:
                raise SystemExit(f"reload {n + 1} not applied within 30 s: {await reload_status()}")
            await asyncio.sleep(0.05)
        seen = time.monotonic()
        s_seen = sched()
        gen = int(m["ringtun_config_generation"])
        await asyncio.sleep(0.3)  # round-trips that started during the reload come back
        after = await scrape()
        name = "ringtun_reactor_snapshot_adoption_seconds"
        s0, s1 = per_reactor(before, name + "_sum"), per_reactor(after, name + "_sum")
        c0, c1 = per_reactor(before, name + "_count"), per_reactor(after, name + "_count")
        adoption = {r: (s1[r] - s0.get(r, 0)) / max(1, c1[r] - c0.get(r, 0)) for r in s1}
        # Round-trips that started between the signal and 100 ms after the node said the
        # reload was applied (the reactors adopted it before that).
        rtt = window(t0, seen + 0.1)
        rows.append({
            "reload": n + 1,
            "generation": gen,
            "applied_in_s": after["ringtun_config_reload_seconds"],
            "adoption_ms": {r: round(v * 1e3, 3) for r, v in sorted(adoption.items())},
            "adoptions": {r: int(c1[r] - c0.get(r, 0)) for r in sorted(c1)},
            "reloads_applied": int(after['ringtun_config_reloads_total{result="applied"}']
                                   - before['ringtun_config_reloads_total{result="applied"}']),
            "control_cpu_ms": round(sched_delta(s_before, s_seen, "control")[0], 1),
            "reactor_wait_ms": round(sched_delta(s_before, s_seen, "reactor")[1], 1),
            "exchanges": len(rtt),
            "worst_rtt_ms": round(max(rtt) * 1e3, 2) if rtt else None,
        })
        await asyncio.sleep(max(0.0, gap - 0.3))
    r1 = time.monotonic()
    s_r1 = sched()
    m_end = await scrape()
    stop.set()
    await asyncio.gather(*tasks)
    # /config_dump says the same as the metric (read once the flows are done: it is big).
    status = await reload_status()
    if abs(status["last_applied_in_seconds"] - m_end["ringtun_config_reload_seconds"]) > 1e-3:
        raise SystemExit(f"/config_dump and the metrics disagree on the last reload: {status}")
    # Flows that ended before the stop: lost connections.
    lost = len(errors)
    quiet_rtt, reload_rtt = window(q0, q1), window(q1, r1)
    longest = lambda m: max(per_reactor(m, "ringtun_reactor_longest_iteration_seconds").values())
    adoption_longest = max(per_reactor(m_end, "ringtun_reactor_snapshot_adoption_longest_seconds").values())
    summary = {
        "flows": flows, "connected": connected, "lost": lost, "errors": errors[:5],
        "quiet": {"secs": round(q1 - q0, 2), "exchanges": len(quiet_rtt),
                  "p50_ms": round(pct(quiet_rtt, 50) * 1e3, 3), "p99_ms": round(pct(quiet_rtt, 99) * 1e3, 3),
                  "max_ms": round(quiet_rtt[-1] * 1e3, 3) if quiet_rtt else None,
                  "longest_iteration_ms": round(longest(m_quiet) * 1e3, 3),
                  "longest_iteration_before_ms": round(longest(m0) * 1e3, 3),
                  "reactor_cpu_ms": round(sched_delta(s_q0, s_q1, "reactor")[0], 1),
                  "reactor_wait_ms": round(sched_delta(s_q0, s_q1, "reactor")[1], 1),
                  "control_cpu_ms": round(sched_delta(s_q0, s_q1, "control")[0], 1)},
        "reloads": {"secs": round(r1 - q1, 2), "exchanges": len(reload_rtt),
                    "p50_ms": round(pct(reload_rtt, 50) * 1e3, 3), "p99_ms": round(pct(reload_rtt, 99) * 1e3, 3),
                    "max_ms": round(reload_rtt[-1] * 1e3, 3) if reload_rtt else None,
                    "longest_iteration_ms": round(longest(m_end) * 1e3, 3),
                    "longest_adoption_ms": round(adoption_longest * 1e3, 3),
                    "reactor_cpu_ms": round(sched_delta(s_q1, s_r1, "reactor")[0], 1),
                    "reactor_wait_ms": round(sched_delta(s_q1, s_r1, "reactor")[1], 1),
                    "control_cpu_ms": round(sched_delta(s_q1, s_r1, "control")[0], 1)},
        "rows": rows,
    }
    with open(csv_out, "w") as f:
        reactors = sorted(rows[0]["adoption_ms"]) if rows else []
        f.write("reload,generation,applied_in_ms,"
                + ",".join(f"adoption_reactor{r}_ms" for r in reactors)
                + ",adoptions_per_reactor,reloads_applied,control_cpu_ms,reactor_runqueue_wait_ms,"
                "exchanges_during_reload,worst_rtt_during_reload_ms\n")
        for row in rows:
            f.write(f"{row['reload']},{row['generation']},{row['applied_in_s'] * 1e3:.1f},"
                    + ",".join(f"{row['adoption_ms'][r]:.3f}" for r in reactors)
                    + f",{min(row['adoptions'].values())},{row['reloads_applied']},{row['control_cpu_ms']},"
                    + f"{row['reactor_wait_ms']},{row['exchanges']},"
                    + f"{row['worst_rtt_ms']}\n")
    with open(json_out, "w") as f:
        json.dump(summary, f, indent=1)

asyncio.run(main())
EOF
mkdir -p "$REPO/perf/results"
CSV="$REPO/perf/results/reload-$STAMP.csv"
OUT="$REPO/perf/results/reload-$STAMP.md"
log "load: $FLOWS flows, $BYTES B every $INTERVAL_MS ms each; quiet ${QUIET_SECS}s, then $RELOADS reloads ${GAP_SECS}s apart"
nsx "$CLI" python3 "$TMP/drive.py" "$SRV_IP" "$ECHO_PORT" "$FLOWS" "$INTERVAL_MS" "$BYTES" "$QUIET_SECS" \
    "$RELOADS" "$GAP_SECS" "$RINGTUN_PID" "$CFG" "$TMP/set0.yaml" "$TMP/set1.yaml" "$NODE" \
    "http://$METRICS/metrics" "http://$ADMIN/config_dump" "$CSV" "$TMP/summary.json" \
    || die "the load driver failed (ringtun log: $TMP/ringtun.log)"
nsx "$NODE" curl -sf "http://$METRICS/metrics" >"$TMP/metrics.txt" || true
kill -0 "$RINGTUN_PID" 2>/dev/null || die "ringtun exited during the run (log: $TMP/ringtun.log)"

# ---------------------------------------------------------------- report
S="$TMP/summary.json"
{
    echo "# ringtun reload under load — $STAMP ($GITREV)"
    echo
    echo "$WORKLOADS workloads, $POLICIES policies ($(du -h "$CFG" | cut -f1) of YAML), $REACTORS reactors ($DRIVER)," \
        "$(jq .connected "$S")/$FLOWS flows open, $BYTES B every $INTERVAL_MS ms each; $(nproc) cores," \
        "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| reload | applied in ms (control) | control threads CPU ms | adoption ms per reactor | reactors' run-queue wait ms | worst round-trip ms while it ran |"
    echo "|---:|---:|---:|---|---:|---:|"
    jq -r '.rows[] | "| \(.reload) | \(.applied_in_s * 1000 | . * 10 | round / 10) | \(.control_cpu_ms) | \(.adoption_ms | to_entries | map(.value | tostring) | join(" / ")) | \(.reactor_wait_ms) | \(.worst_rtt_ms) |"' "$S"
    echo
    echo "| phase | secs | exchanges | p50 ms | p99 ms | max ms | longest reactor iteration since start, ms | reactors CPU ms | reactors' run-queue wait ms | control CPU ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for ph in quiet reloads; do
        jq -r --arg p "$ph" '.[$p] as $x | "| \($p) | \($x.secs) | \($x.exchanges) | \($x.p50_ms) | \($x.p99_ms) | \($x.max_ms) | \($x.longest_iteration_ms) | \($x.reactor_cpu_ms) | \($x.reactor_wait_ms) | \($x.control_cpu_ms) |"' "$S"
    done
    echo
    echo "Longest snapshot adoption on any reactor: $(jq .reloads.longest_adoption_ms "$S") ms." \
        "Flows lost: $(jq .lost "$S")$(jq -r 'if .lost > 0 then " (first: \(.errors[0]))" else "" end' "$S")."
    echo "Per reload: $CSV"
} >"$OUT"
cat "$OUT"
lost=$(jq .lost "$S")
[[ $lost == 0 ]] || { log "$lost flows were lost"; exit 2; }
