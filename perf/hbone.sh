#!/usr/bin/env bash
# perf/hbone.sh — HBONE tunnels side by side, in one run: no tunnel, the conventional tunnel
# (h2-tunnel: the h2 crate over tokio-rustls, user-space copies — what Istio's ztunnel does),
# and ringtun node to node.
#
# Builds ringtun and perf/tools (release), creates its own network namespaces (client pod,
# node/router, server pod) and for each row runs iperf3 with 1 and 4 streams, a connection-rate
# load and a ping-pong latency load through the same path, measuring the tunnel processes' CPU
# time from /proc. A row that cannot be set up or measured is reported as failed; the others
# still run. Prints one table (plain and markdown) and writes the markdown to
# perf/results/hbone-<date>.md. Exit 0 when every row was measured, 2 when a row failed (the
# report is still written), 1 when the run itself could not be set up. Needs root. See
# perf/README.md for what the numbers mean.
#
# Environment (all optional):
#   PERF_SECS=10            seconds per test (iperf3 -t, tcp-load --duration)
#   PERF_ROUNDS=1           repeat every row this many times (interleaved); the median is reported
#   PERF_ROWS="direct h2-baseline ringtun-hbone"   rows to run, in this order
#   PERF_REACTORS=<nproc>   ringtun reactors per node and h2-tunnel --threads per process
#   PERF_PIN=false          ringtun node.pin_reactors (both nodes run on this one machine)
#   PERF_DRIVER=            ringtun --driver (io-uring | epoll); empty: ringtun picks
#   PERF_RATE_CONCURRENCY=32   tcp-load rate --concurrency
#   PERF_MSG_BYTES=1024     bytes per exchange for tcp-load rate and latency
#   PERF_NO_BUILD=0         1: skip `cargo build --release` (use the existing binaries)
#   PERF_IPERF_ARGS=        extra iperf3 client arguments for every iperf3 test (e.g. -R: the
#                           server sends, so tunnels carry bytes the other way); the report
#                           names them
#   PERF_RINGTUN=           the ringtun binary to measure (default: the release build), to
#                           compare two builds in alternating runs
#   PERF_KEEP_LOGS=0        1: keep the scratch directory (logs, configs, certificates, raw JSON)
#   PERF_REVERSE=0          1: also run each iperf3 test with -R (server → client); the table
#                           shows the forward direction, the CSV both
#   PERF_CSV=, PERF_RATE_LIST=, PERF_OPEN_RATES=, PERF_BULK_FLOWS=   what perf/run adds: every
#                           result as CSV and the tcp-load tests (perf/lib/loadtests.sh)
set -Eeuo pipefail

SECS=${PERF_SECS:-10}
ROUNDS=${PERF_ROUNDS:-1}
ROWS=${PERF_ROWS:-"direct h2-baseline ringtun-hbone"}
REACTORS=${PERF_REACTORS:-$(nproc)}
# Both nodes share this machine: pinned reactors of A and B would fight over the same cores.
PIN=${PERF_PIN:-false}
DRIVER=${PERF_DRIVER:-}
RATE_CONC=${PERF_RATE_CONCURRENCY:-32}
MSG_BYTES=${PERF_MSG_BYTES:-1024}
NO_BUILD=${PERF_NO_BUILD:-0}
KEEP=${PERF_KEEP_LOGS:-0}
REVERSE=${PERF_REVERSE:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

PREFIX="rthb$$"
NODE="$PREFIX-node"
CLI="$PREFIX-cli"
SRV="$PREFIX-srv"
CLI_IP=10.77.1.2
SRV_IP=10.77.4.2
IPERF_PORT=5201
ECHO_PORT=7000
SINK_PORT=7001
HBONE_PORT=15008
H2_IPERF_PORT=25201 # h2-tunnel client listeners, on the client pod's loopback
H2_ECHO_PORT=27000
H2_SINK_PORT=27001

HZ=$(getconf CLK_TCK)
TMP=""
PIDS=()  # every background process we started
NSES=()  # every namespace we created
REDIRECTED=() # namespaces with ringtun capture rules installed

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'hbone.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "hbone.sh: failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

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
    local rc=$? pid i ns
    set +e
    trap - ERR
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    for ns in "${REDIRECTED[@]}"; do "$RINGTUN" redirect remove --netns "$ns" >/dev/null 2>&1; done
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

# ---------------------------------------------------------------- tools
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, iptables); run: sudo $0"

need() { # need <command> [debian package]: install the package when the command is missing
    local cmd=$1 pkg=${2:-}
    command -v "$cmd" >/dev/null 2>&1 && return 0
    [[ -n $pkg ]] || die "required tool '$cmd' is missing and I do not know its package; install it"
    log "'$cmd' missing: apt-get install -y $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >&2 \
        || die "apt-get install $pkg failed; install '$cmd' yourself"
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still missing after installing $pkg"
}
need cargo
need ip iproute2
need ss iproute2
need iptables iptables
need timeout coreutils
need column bsdextrautils
need jq jq
need curl curl
need iperf3 iperf3

for v in SECS ROUNDS REACTORS RATE_CONC MSG_BYTES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "PERF_$v must be a positive integer (got '${!v}')"
done
[[ -n ${ROWS// /} ]] || die "PERF_ROWS is empty"
for row in $ROWS; do
    case $row in direct | h2-baseline | ringtun-hbone) ;; *) die "unknown row '$row' in PERF_ROWS (direct, h2-baseline, ringtun-hbone)" ;; esac
done

TMP=$(mktemp -d /tmp/ringtun-hbone-perf.XXXXXX)

# ---------------------------------------------------------------- build
if [[ $NO_BUILD != 1 ]]; then
    log "cargo build --release (ringtun, h2-tunnel, tcp-load)"
    (cd "$REPO" && cargo build --release -p ringtun -p ringtun-perf-tools --bin ringtun --bin h2-tunnel --bin tcp-load) \
        >"$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log" >&2; die "cargo build --release failed"; }
fi
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory) \
    || die "cargo metadata failed"
RINGTUN="${PERF_RINGTUN:-$TARGET_DIR/release/ringtun}"
H2TUN="$TARGET_DIR/release/h2-tunnel"
LOAD="$TARGET_DIR/release/tcp-load"
for b in "$RINGTUN" "$H2TUN" "$LOAD"; do
    [[ -x $b ]] || die "no binary at $b (build it, or unset PERF_NO_BUILD)"
done
# shellcheck source=perf/lib/loadtests.sh
source "$HERE/lib/loadtests.sh"

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

# A row's failure: the reason, kept for the table; the row's functions then return 1.
ROW_ERR=""
fail() { ROW_ERR=$*; return 1; }

last_log_line() { tail -n 3 "$TMP/$1.log" 2>/dev/null | tr '\n' ' ' | cut -c1-300; }

wait_listen() { # wait_listen <netns> <port> <pid> <name>: until a TCP listener exists (or fail)
    local ns=$1 port=$2 pid=$3 name=$4 i
    for i in $(seq 200); do
        if nsx "$ns" ss -Hltn "sport = :$port" | grep -q .; then return 0; fi
        kill -0 "$pid" 2>/dev/null || fail "$name exited before listening on :$port: $(last_log_line "$name")" || return 1
        sleep 0.05
    done
    fail "nothing listens on :$port in $ns after 10 s ($name)"
}

proc_ticks() { # utime+stime of one process (all its threads), 0 if gone
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    echo $((f[11] + f[12]))
}

proxy_cpu() { # CPU ticks of every tunnel process of the row (0 for direct)
    local total=0 pid
    for pid in "${PROXY_PIDS[@]}"; do total=$((total + $(proc_ticks "$pid"))); done
    echo "$total"
}

calc() { awk "BEGIN { printf \"%s\", $* }"; }

metric() { # metric <addr> <name> [label text]: sum of a ringtun metric's samples ("" when absent)
    nsx "$NODE" curl -sf "http://$1/metrics" 2>/dev/null |
        awk -v n="$2" -v l="${3:-}" '$0 !~ /^#/ && (index($0, n "{") == 1 || index($0, n " ") == 1) && (l == "" || index($0, l)) { s += $NF; seen = 1 } END { if (seen) printf "%.0f", s }' || true
}

# ---------------------------------------------------------------- topology
add_ns() {
    ip netns add "$1" || die "ip netns add $1 failed"
    NSES+=("$1")
    ip -n "$1" link set lo up
}

log "namespaces: $NODE (router, ringtun nodes) $CLI (client pod $CLI_IP) $SRV (server pod $SRV_IP)"
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
# The rate test opens tens of thousands of connections; the side closing first keeps each in
# TIME_WAIT. Let connect() reuse those ports (every row alike) instead of running out of them,
# from a range above every port this script listens on.
for ns in "$CLI" "$SRV" "$NODE"; do
    nsx "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
    nsx "$ns" sysctl -qw net.ipv4.ip_local_port_range="28000 65535"
done

# ---------------------------------------------------------------- servers (server pod)
start_bg iperf3-server "$SRV" iperf3 -s -B "$SRV_IP" -p "$IPERF_PORT"
wait_listen "$SRV" "$IPERF_PORT" "$LAST_PID" iperf3-server || die "$ROW_ERR"
start_bg echo-server "$SRV" "$LOAD" echo --listen "$SRV_IP:$ECHO_PORT"
wait_listen "$SRV" "$ECHO_PORT" "$LAST_PID" echo-server || die "$ROW_ERR"
start_bg sink-server "$SRV" "$LOAD" sink --listen "$SRV_IP:$SINK_PORT"
wait_listen "$SRV" "$SINK_PORT" "$LAST_PID" sink-server || die "$ROW_ERR"
nsx "$CLI" "$LOAD" latency --target "$SRV_IP:$ECHO_PORT" --duration 0.2 --strict >/dev/null 2>"$TMP/check.err" \
    || die "client pod cannot reach the echo server: $(cat "$TMP/check.err")"

# ---------------------------------------------------------------- configs and certificates
node_config() { # node_config <node-a|node-b> <admin port base>
    local base=$2
    cat <<EOF
version: 1
node:
  name: $1
  reactors: $REACTORS
  pin_reactors: $PIN
  admin: 127.0.0.1:$base
  metrics: 127.0.0.1:$((base + 20))
  readiness: 127.0.0.1:$((base + 21))
  tls:
    trust_bundle: $TMP/certs/ca.pem
    certificate_dir: $TMP/certs
workloads:
  - name: client
    namespace: default
    service_account: client
    ips: [$CLI_IP]
    node: node-a
    protocol: TCP
    netns: /run/netns/$CLI
  - name: server
    namespace: default
    service_account: server
    ips: [$SRV_IP]
    node: node-b
    protocol: HBONE
    netns: /run/netns/$SRV
services: []
EOF
}
CFG_A="$TMP/node-a.yaml"
CFG_B="$TMP/node-b.yaml"
node_config node-a 15000 >"$CFG_A"
node_config node-b 16000 >"$CFG_B"
"$RINGTUN" certs --config "$CFG_A" --out "$TMP/certs" >"$TMP/certs.log" 2>&1 \
    || { cat "$TMP/certs.log" >&2; die "ringtun certs failed"; }
for cfg in "$CFG_A" "$CFG_B"; do
    "$RINGTUN" check-config "$cfg" >"$TMP/check-config.log" 2>&1 \
        || { cat "$TMP/check-config.log" >&2; die "generated ringtun config is invalid: $cfg"; }
done
CLI_TLS=(--cert "$TMP/certs/default/client/cert.pem" --key "$TMP/certs/default/client/key.pem" --ca "$TMP/certs/ca.pem")
SRV_TLS=(--cert "$TMP/certs/default/server/cert.pem" --key "$TMP/certs/default/server/key.pem" --ca "$TMP/certs/ca.pem")

# ---------------------------------------------------------------- rows
# start_row sets PROXY_PIDS (CPU is measured on these), IPERF_HOST/IPERF_DST (iperf3 -c/-p)
# and ECHO_ADDR (tcp-load --target); returns 1 with ROW_ERR set when the row cannot start.
start_ringtun() { # start_ringtun <node-a|node-b> <config> <port base> <round>
    local name="ringtun-$1-$4" i
    start_bg "$name" "$NODE" "$RINGTUN" run --config "$2" --reactors "$REACTORS" ${DRIVER:+--driver "$DRIVER"}
    PROXY_PIDS+=("$LAST_PID")
    for i in $(seq 200); do
        nsx "$NODE" curl -sf -o /dev/null "http://127.0.0.1:$(($3 + 21))/healthz/ready" && return 0
        kill -0 "$LAST_PID" 2>/dev/null || fail "ringtun $1 exited during start-up: $(last_log_line "$name")" || return 1
        sleep 0.05
    done
    fail "ringtun $1 not ready after 10 s (log: $TMP/$name.log)"
}

start_row() {
    local row=$1 round=$2 ns
    PROXY_PIDS=()
    case $row in
        direct)
            IPERF_HOST=$SRV_IP IPERF_DST=$IPERF_PORT ECHO_ADDR=$SRV_IP:$ECHO_PORT SINK_ADDR=$SRV_IP:$SINK_PORT
            ;;
        h2-baseline)
            start_bg "h2-server-$round" "$SRV" "$H2TUN" server --listen "$SRV_IP:$HBONE_PORT" --threads "$REACTORS" "${SRV_TLS[@]}"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$SRV" "$HBONE_PORT" "$LAST_PID" "h2-server-$round" || return 1
            start_bg "h2-client-iperf-$round" "$CLI" "$H2TUN" client --listen "127.0.0.1:$H2_IPERF_PORT" \
                --peer "$SRV_IP:$HBONE_PORT" --target "$SRV_IP:$IPERF_PORT" --threads "$REACTORS" "${CLI_TLS[@]}"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$CLI" "$H2_IPERF_PORT" "$LAST_PID" "h2-client-iperf-$round" || return 1
            start_bg "h2-client-echo-$round" "$CLI" "$H2TUN" client --listen "127.0.0.1:$H2_ECHO_PORT" \
                --peer "$SRV_IP:$HBONE_PORT" --target "$SRV_IP:$ECHO_PORT" --threads "$REACTORS" "${CLI_TLS[@]}"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$CLI" "$H2_ECHO_PORT" "$LAST_PID" "h2-client-echo-$round" || return 1
            start_bg "h2-client-sink-$round" "$CLI" "$H2TUN" client --listen "127.0.0.1:$H2_SINK_PORT" \
                --peer "$SRV_IP:$HBONE_PORT" --target "$SRV_IP:$SINK_PORT" --threads "$REACTORS" "${CLI_TLS[@]}"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$CLI" "$H2_SINK_PORT" "$LAST_PID" "h2-client-sink-$round" || return 1
            IPERF_HOST=127.0.0.1 IPERF_DST=$H2_IPERF_PORT ECHO_ADDR=127.0.0.1:$H2_ECHO_PORT SINK_ADDR=127.0.0.1:$H2_SINK_PORT
            ;;
        ringtun-hbone)
            for ns in "$CLI:$CFG_A" "$SRV:$CFG_B"; do
                REDIRECTED+=("${ns%%:*}")
                "$RINGTUN" redirect install --netns "${ns%%:*}" --config "${ns#*:}" >"$TMP/redirect-install.log" 2>&1 \
                    || fail "ringtun redirect install in ${ns%%:*}: $(tail -n 2 "$TMP/redirect-install.log" | tr '\n' ' ')" || return 1
            done
            start_ringtun node-a "$CFG_A" 15000 "$round" || return 1
            start_ringtun node-b "$CFG_B" 16000 "$round" || return 1
            wait_listen "$CLI" 15001 "${PROXY_PIDS[0]}" "ringtun-node-a-$round" || return 1
            wait_listen "$SRV" "$HBONE_PORT" "${PROXY_PIDS[1]}" "ringtun-node-b-$round" || return 1
            IPERF_HOST=$SRV_IP IPERF_DST=$IPERF_PORT ECHO_ADDR=$SRV_IP:$ECHO_PORT SINK_ADDR=$SRV_IP:$SINK_PORT
            ;;
    esac
    # One short exchange through the path before measuring: a broken path fails here, with the
    # tool's own reason, instead of as an iperf3 timeout.
    nsx "$CLI" "$LOAD" latency --target "$ECHO_ADDR" --duration 0.3 --strict >"$TMP/smoke-$row-$round.json" 2>"$TMP/smoke-$row-$round.err" \
        || fail "no echo through the path: $(tail -n 1 "$TMP/smoke-$row-$round.err")"
}

stop_row() { # stops the row's processes and rules; anything left behind would skew the next row
    local row=$1 pid ns p
    for pid in "${PROXY_PIDS[@]}"; do stop_pid "$pid"; done
    if [[ $row == ringtun-hbone ]]; then
        for ns in "${REDIRECTED[@]}"; do
            "$RINGTUN" redirect remove --netns "$ns" >"$TMP/redirect-remove.log" 2>&1 \
                || { cat "$TMP/redirect-remove.log" >&2; die "ringtun redirect remove in $ns failed"; }
        done
        REDIRECTED=()
    fi
    for p in 15001 15006 "$HBONE_PORT" "$H2_IPERF_PORT" "$H2_ECHO_PORT" "$H2_SINK_PORT"; do
        for ns in "$CLI" "$SRV"; do
            nsx "$ns" ss -Hltn "sport = :$p" | grep -q . && die "port $p still listening in $ns after stopping $row"
        done
    done
    return 0
}

declare -A R   # R[row:metric:round] = value
declare -A STATUS # STATUS[row:round] = "ok" or the reason the row failed

run_iperf() { # run_iperf <row> <round> <streams> [rev]: R keys p1, p4 (forward), p1r, p4r (-R)
    local row=$1 round=$2 p=$3 dir=${4:-fwd} key=p$3 flag=() json t0 t1 err
    [[ $dir == rev ]] && key=p${p}r flag=(-R)
    json="$TMP/iperf-$1-$key-$2.json"
    t0=$(proxy_cpu)
    # shellcheck disable=SC2086 # PERF_IPERF_ARGS is a list of arguments
    if ! timeout $((SECS + 60)) ip netns exec "$CLI" iperf3 -c "$IPERF_HOST" -p "$IPERF_DST" -P "$p" -t "$SECS" "${flag[@]}" ${PERF_IPERF_ARGS:-} -J >"$json" 2>"$json.err"; then
        err=$(jq -r '.error // empty' "$json" 2>/dev/null || true)
        fail "iperf3 -P $p: ${err:-$(tail -n 1 "$json.err")}"
        return 1
    fi
    t1=$(proxy_cpu)
    iperf_record hbone "$row" "$round" "$key" "$dir-P$p" "$json" "$t0" "$t1"
    log "  iperf3 -P $p${flag[*]:+ -R}: $(printf '%.2f' "${R[$row:$key.gbps:$round]}") Gbit/s, tunnel CPU ${R[$row:$key.cpu:$round]} s"
}

run_load() { # run_load <row> <round> <rate|latency>
    local row=$1 round=$2 mode=$3 json="$TMP/load-$1-$3-$2.json" t0 t1 conc
    conc=(--concurrency "$RATE_CONC")
    [[ $mode == latency ]] && conc=(--connections 1)
    t0=$(proxy_cpu)
    if ! timeout $((SECS + 60)) ip netns exec "$CLI" "$LOAD" "$mode" --target "$ECHO_ADDR" "${conc[@]}" \
        --duration "$SECS" --bytes "$MSG_BYTES" >"$json" 2>"$json.err"; then
        fail "tcp-load $mode: $(tail -n 1 "$json.err")"
        return 1
    fi
    t1=$(proxy_cpu)
    R[$row:$mode.errors:$round]=$(jq -r .errors "$json")
    R[$row:$mode.cpu:$round]=$(calc "($t1 - $t0) / $HZ")
    if [[ $mode == rate ]]; then
        R[$row:rate.cps:$round]=$(jq -r .conns_per_sec "$json")
        R[$row:rate.conns:$round]=$(jq -r .conns "$json")
        csv_add hbone "$row" "$round" rate "$RATE_CONC" conns_per_sec "${R[$row:rate.cps:$round]}"
        csv_add hbone "$row" "$round" rate "$RATE_CONC" conns "${R[$row:rate.conns:$round]}"
        csv_add hbone "$row" "$round" rate "$RATE_CONC" errors "${R[$row:rate.errors:$round]}"
        csv_add hbone "$row" "$round" rate "$RATE_CONC" cpu_s "${R[$row:rate.cpu:$round]}"
        log "  tcp-load rate: ${R[$row:rate.cps:$round]} conns/s, errors ${R[$row:rate.errors:$round]}, tunnel CPU ${R[$row:rate.cpu:$round]} s"
    else
        R[$row:lat.p50:$round]=$(jq -r .p50_us "$json")
        R[$row:lat.p99:$round]=$(jq -r .p99_us "$json")
        R[$row:lat.p999:$round]=$(jq -r .p999_us "$json")
        R[$row:lat.n:$round]=$(jq -r .exchanges "$json")
        csv_add hbone "$row" "$round" latency 1 p50_us "${R[$row:lat.p50:$round]}"
        csv_add hbone "$row" "$round" latency 1 p99_us "${R[$row:lat.p99:$round]}"
        csv_add hbone "$row" "$round" latency 1 p999_us "${R[$row:lat.p999:$round]}"
        log "  tcp-load latency: p50 ${R[$row:lat.p50:$round]} µs, p99 ${R[$row:lat.p99:$round]} µs"
    fi
}

# For ringtun: the traffic must really have been captured by node A and, where ringtun exports
# the counter, have crossed an HBONE stream at both nodes.
NODE_A_METRICS=127.0.0.1:15020
NODE_B_METRICS=127.0.0.1:16020
check_ringtun_path() { # check_ringtun_path <accepted before> <A streams before> <B streams before>
    local acc a b
    acc=$(metric $NODE_A_METRICS ringtun_connections_accepted_total)
    [[ -n $acc && $acc -gt ${1:-0} ]] || fail "node A accepted no connection (capture rules bypassed?)" || return 1
    a=$(metric $NODE_A_METRICS ringtun_hbone_streams_total)
    b=$(metric $NODE_B_METRICS ringtun_hbone_streams_total)
    if [[ -n $a && -n $b ]]; then
        [[ $a -gt ${2:-0} && $b -gt ${3:-0} ]] \
            || fail "no new HBONE stream at node A ($a) and node B ($b): traffic did not go through a tunnel" || return 1
    else
        log "  (no ringtun_hbone_streams_total exported: tunnel use not confirmed by metrics)"
    fi
}

measure_row() { # measure_row <row> <round>: every test of the row, stopping at the first failure
    local row=$1 round=$2 acc0="" sa0="" sb0=""
    if [[ $row == ringtun-hbone ]]; then
        acc0=$(metric $NODE_A_METRICS ringtun_connections_accepted_total)
        sa0=$(metric $NODE_A_METRICS ringtun_hbone_streams_total)
        sb0=$(metric $NODE_B_METRICS ringtun_hbone_streams_total)
    fi
    run_iperf "$row" "$round" 1 || return 1
    if [[ $row == ringtun-hbone ]]; then check_ringtun_path "$acc0" "$sa0" "$sb0" || return 1; fi
    run_iperf "$row" "$round" 4 || return 1
    if [[ $REVERSE == 1 ]]; then
        run_iperf "$row" "$round" 1 rev || return 1
        run_iperf "$row" "$round" 4 rev || return 1
    fi
    run_load "$row" "$round" rate || return 1
    run_load "$row" "$round" latency || return 1
    loadtests hbone "$row" "$round" || return 1
    if [[ $row == ringtun-hbone ]]; then
        nsx "$NODE" curl -sf "http://$NODE_A_METRICS/metrics" >"$TMP/metrics-node-a-$round.txt" || true
        nsx "$NODE" curl -sf "http://$NODE_B_METRICS/metrics" >"$TMP/metrics-node-b-$round.txt" || true
    fi
}

ringtun_tunnel_tls() { # how ringtun's tunnels did TLS (kTLS or user space), from its metrics
    cat "$TMP"/metrics-node-a-*.txt 2>/dev/null |
        sed -n 's/^ringtun_hbone_tunnels_total{[^}]*tls="\([^"]*\)".*/\1/p' | sort -u | paste -sd, -
}

# ---------------------------------------------------------------- run
FAILED_ROWS=0
log "ringtun $("$RINGTUN" --version 2>/dev/null | awk '{print $2}'), reactors/threads $REACTORS, ${SECS}s per test, $ROUNDS round(s): $ROWS"
for round in $(seq "$ROUNDS"); do
    for row in $ROWS; do
        log "round $round/$ROUNDS: $row"
        ROW_ERR=""
        if start_row "$row" "$round" && measure_row "$row" "$round"; then
            STATUS[$row:$round]=ok
        else
            STATUS[$row:$round]=${ROW_ERR:-unknown failure}
            FAILED_ROWS=1
            log "  $row FAILED: ${STATUS[$row:$round]} (logs: $TMP)"
        fi
        stop_row "$row"
    done
done

# ---------------------------------------------------------------- report
median() { # median of the per-round values of R[row:metric:*] ("" when none)
    local row=$1 m=$2 r
    for r in $(seq "$ROUNDS"); do echo "${R[$row:$m:$r]:-}"; done | awk 'NF' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum() { # sum of R[row:metric:*] over rounds and the listed metrics
    local row=$1 r m
    shift
    for r in $(seq "$ROUNDS"); do for m in "$@"; do echo "${R[$row:$m:$r]:-0}"; done; done | awk '{ s += $1 } END { printf "%.6f", s }'
}
fmt() { [[ -z $2 ]] && echo "–" || printf "%.${1}f" "$2"; }
ratio() { [[ -z $1 || -z $2 ]] && { echo "–"; return; }; awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }'; }

declare -A LABEL=(
    [direct]="direct (no tunnel)"
    [h2-baseline]="h2-tunnel (h2 + rustls)"
    [ringtun-hbone]="ringtun HBONE"
)

declare -A F
for row in $ROWS; do
    ok=0 failed=0 reason=""
    for r in $(seq "$ROUNDS"); do
        if [[ ${STATUS[$row:$r]} == ok ]]; then ok=$((ok + 1)); else failed=$((failed + 1)) reason=${STATUS[$row:$r]}; fi
    done
    if [[ $failed -eq 0 ]]; then F[$row:status]=ok
    elif [[ $ok -eq 0 ]]; then F[$row:status]="failed: $reason"
    else F[$row:status]="failed in $failed/$ROUNDS rounds: $reason"; fi
    F[$row:p1]=$(median "$row" p1.gbps)
    F[$row:p4]=$(median "$row" p4.gbps)
    F[$row:cps]=$(median "$row" rate.cps)
    F[$row:p50]=$(median "$row" lat.p50)
    F[$row:p99]=$(median "$row" lat.p99)
    F[$row:cpugb]="" F[$row:cpuconn]=""
    if [[ $row != direct ]]; then
        cpu=$(sum "$row" p1.cpu p4.cpu) bytes=$(sum "$row" p1.bytes p4.bytes)
        F[$row:cpugb]=$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { if (b > 0) printf "%.3f", c / (b / 1e9) }')
        cpu=$(sum "$row" rate.cpu) conns=$(sum "$row" rate.conns)
        F[$row:cpuconn]=$(awk -v c="$cpu" -v n="$conns" 'BEGIN { if (n > 0) printf "%.1f", c * 1e6 / n }')
    fi
done
D() { echo "${F[direct:$1]:-}"; }
H() { echo "${F[h2-baseline:$1]:-}"; }
vs_h2() { # ratio to h2-baseline, only for the ringtun row
    [[ $1 == ringtun-hbone ]] && ratio "${F[$1:$2]}" "$(H "$2")" || echo "–"
}

STAMP=$(date +%Y-%m-%dT%H%M%S)
GITREV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
(cd "$REPO" && git diff --quiet HEAD -- src perf/tools Cargo.toml 2>/dev/null) || GITREV="$GITREV+dirty"
HEAD_MD="| path | iperf3 -P1 Gbit/s | × direct | × h2-baseline | iperf3 -P4 Gbit/s | × direct | × h2-baseline | tunnel CPU-s/GB | × h2-baseline | conns/s | × direct | × h2-baseline | tunnel CPU µs/conn | latency p50 µs | p99 µs | status |"
SEP_MD="|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
TABLE_MD="$HEAD_MD"$'\n'"$SEP_MD"
TABLE_TXT="path|P1_Gbit/s|x_direct|x_h2|P4_Gbit/s|x_direct|x_h2|CPU-s/GB|x_h2|conns/s|x_direct|x_h2|CPU_us/conn|p50_us|p99_us|status"
for row in $ROWS; do
    status=${F[$row:status]}
    short=$([[ $status == ok ]] && echo ok || echo failed)
    cells=(
        "${LABEL[$row]}"
        "$(fmt 2 "${F[$row:p1]}")" "$(ratio "${F[$row:p1]}" "$(D p1)")" "$(vs_h2 "$row" p1)"
        "$(fmt 2 "${F[$row:p4]}")" "$(ratio "${F[$row:p4]}" "$(D p4)")" "$(vs_h2 "$row" p4)"
        "$(fmt 3 "${F[$row:cpugb]}")" "$(vs_h2 "$row" cpugb)"
        "$(fmt 0 "${F[$row:cps]}")" "$(ratio "${F[$row:cps]}" "$(D cps)")" "$(vs_h2 "$row" cps)"
        "$(fmt 1 "${F[$row:cpuconn]}")"
        "$(fmt 1 "${F[$row:p50]}")" "$(fmt 1 "${F[$row:p99]}")"
    )
    line="|"
    for c in "${cells[@]}"; do line+=" $c |"; done
    TABLE_MD+=$'\n'"$line $status |"
    TABLE_TXT+=$'\n'"$(IFS='|'; echo "${cells[*]// /_}")|$short"
done

DETAILS_MD="| path | round | test | result | GB moved / conns / exchanges | retransmits / errors | tunnel CPU s |"$'\n'"|---|---:|---|---:|---:|---:|---:|"
for row in $ROWS; do
    for r in $(seq "$ROUNDS"); do
        for p in 1 4; do
            [[ -n ${R[$row:p$p.gbps:$r]:-} ]] || continue
            DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | iperf3 -P $p | $(fmt 2 "${R[$row:p$p.gbps:$r]}") Gbit/s | $(calc "${R[$row:p$p.bytes:$r]} / 1e9") | ${R[$row:p$p.retr:$r]} | ${R[$row:p$p.cpu:$r]} |"
        done
        [[ -n ${R[$row:rate.cps:$r]:-} ]] &&
            DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | tcp-load rate (c=$RATE_CONC, $MSG_BYTES B) | $(fmt 0 "${R[$row:rate.cps:$r]}") conns/s | ${R[$row:rate.conns:$r]} | ${R[$row:rate.errors:$r]} | ${R[$row:rate.cpu:$r]} |"
        [[ -n ${R[$row:lat.p50:$r]:-} ]] &&
            DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | tcp-load latency (1 conn, $MSG_BYTES B) | p50 ${R[$row:lat.p50:$r]} / p99 ${R[$row:lat.p99:$r]} / p99.9 ${R[$row:lat.p999:$r]} µs | ${R[$row:lat.n:$r]} | ${R[$row:latency.errors:$r]} | ${R[$row:latency.cpu:$r]} |"
        [[ ${STATUS[$row:$r]} == ok ]] || DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | **failed** | ${STATUS[$row:$r]//|/\\|} | | | |"
    done
done

REPORT="# HBONE tunnels — $STAMP

- ringtun $GITREV, $(uname -sr), $(nproc) cores, ${SECS}s per test, $ROUNDS round(s) (median shown)
- ringtun reactors per node / h2-tunnel threads per process: $REACTORS
- iperf3 client pod → server pod, \`-P 1\` and \`-P 4\`${PERF_IPERF_ARGS:+, with \`$PERF_IPERF_ARGS\`}; tcp-load rate (concurrency $RATE_CONC) and latency (1 connection), $MSG_BYTES-byte echo exchanges
- topology: client pod ns → veth → node ns (router) → veth → server pod ns; h2-tunnel client in the client pod (explicit, on 127.0.0.1), h2-tunnel server in the server pod on :$HBONE_PORT; ringtun node A captures the client pod's outbound traffic, node B takes the tunnel on the server pod's :$HBONE_PORT (TPROXY)
- ringtun tunnel TLS (node A's \`ringtun_hbone_tunnels_total\` tls label): $(ringtun_tunnel_tls | grep . || echo "not reported")
- tunnel CPU = utime+stime of every tunnel process of the row (both ends) from /proc during each test; CPU-s/GB over both iperf3 tests and all rounds, CPU µs/conn over the rate tests; the other figures are medians

$TABLE_MD

## Details

$DETAILS_MD
"
mkdir -p "$REPO/perf/results"
OUT="$REPO/perf/results/hbone-$STAMP.md"
printf '%s' "$REPORT" >"$OUT"

echo
echo "$TABLE_TXT" | column -t -s '|' | sed 's/_/ /g'
echo
printf '%s' "$REPORT"
log "written: $OUT"
if [[ $FAILED_ROWS == 1 ]]; then
    log "some rows failed (see the status column); exit 2, scratch directory kept"
    exit 2
fi
