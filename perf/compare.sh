#!/usr/bin/env bash
# perf/compare.sh — ringtun side by side with no proxy, socat and HAProxy, in one run.
#
# Builds ringtun (release), creates its own network namespaces (client, node router, server),
# and for each path runs a single-stream iperf3 (both directions) and a wrk load, measuring the
# proxy's CPU time from /proc. Prints one table (plain and markdown) and writes the markdown to
# perf/results/<date>.md. Needs root. See perf/README.md for what the numbers mean.
#
# Environment (all optional):
#   PERF_SECS=10            seconds per test (iperf3 -t, wrk -d)
#   PERF_ROUNDS=1           repeat every row this many times (interleaved); the median is reported
#   PERF_ROWS="direct ringtun-uring ringtun-epoll socat haproxy"   rows to run, in this order
#   PERF_REACTORS=<nproc>   ringtun --reactors and HAProxy nbthread
#   PERF_PIPE_SIZE=         ringtun splice.pipe_size in bytes (empty: ringtun's default)
#   PERF_REVERSE=1          also run iperf3 -R (server → client)
#   PERF_IPERF_STREAMS=1    iperf3 -P for each of these stream counts ("1 4"); the table shows -P 1
#   PERF_WRK_THREADS=2 PERF_WRK_CONNS=50
#   PERF_HAPROXY_SPLICE=auto   auto (option splice-auto) | always (splice-request+response) | off
#   PERF_NGINX_WORKERS=auto
#   PERF_NO_BUILD=0         1: skip `cargo build --release` (use the existing binary)
#   PERF_KEEP_LOGS=0        1: keep the scratch directory (logs, configs, raw JSON) on success
#   PERF_RINGTUN=           the ringtun binary to measure (default: the release build), to
#                           compare two builds in alternating runs
#   PERF_CSV=, PERF_RATE_LIST=, PERF_OPEN_RATES=, PERF_BULK_FLOWS=   what perf/run adds: every
#                           result as CSV and the tcp-load tests (perf/lib/loadtests.sh); not
#                           run on the socat row
set -Eeuo pipefail

SECS=${PERF_SECS:-10}
ROUNDS=${PERF_ROUNDS:-1}
ROWS=${PERF_ROWS:-"direct ringtun-uring ringtun-epoll socat haproxy"}
REACTORS=${PERF_REACTORS:-$(nproc)}
PIPE_SIZE=${PERF_PIPE_SIZE:-}
REVERSE=${PERF_REVERSE:-1}
IPERF_STREAMS=${PERF_IPERF_STREAMS:-1}
WRK_THREADS=${PERF_WRK_THREADS:-2}
WRK_CONNS=${PERF_WRK_CONNS:-50}
HAPROXY_SPLICE=${PERF_HAPROXY_SPLICE:-auto}
NGINX_WORKERS=${PERF_NGINX_WORKERS:-auto}
NO_BUILD=${PERF_NO_BUILD:-0}
KEEP=${PERF_KEEP_LOGS:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

PREFIX="rtperf$$"
NODE="$PREFIX-node"
CLI="$PREFIX-cli"
SRV="$PREFIX-srv"
CLI_IP=10.77.1.2
CLI_IP6=fd77:1::2
SRV_IP=10.77.4.2
IPERF_PORT=5201
HTTP_PORT=80
PROXY_IPERF_PORT=25201   # socat / HAProxy listen here on the client's loopback
PROXY_HTTP_PORT=28080
ECHO_PORT=7000           # tcp-load echo and sink servers (perf/lib/loadtests.sh)
SINK_PORT=7001
PROXY_ECHO_PORT=27000
PROXY_SINK_PORT=27001
METRICS=127.0.0.1:15020  # ringtun's endpoints, inside the node namespace
READY=127.0.0.1:15021

HZ=$(getconf CLK_TCK)
TMP=""
PIDS=()        # every background process we started
NSES=()        # every namespace we created
RINGTUN=""

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'compare.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "compare.sh: failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- cleanup (always runs)
stop_pid() { # SIGTERM a process we started (and its direct children, e.g. socat forks), wait, then SIGKILL
    local pid=$1 i c
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for c in $(ps --ppid "$pid" -o pid= 2>/dev/null || true); do kill -TERM "$c" 2>/dev/null || true; done
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM for 10 s; SIGKILL"
        for c in $(ps --ppid "$pid" -o pid= 2>/dev/null || true); do kill -KILL "$c" 2>/dev/null || true; done
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
need ps procps
need timeout coreutils
need jq jq
need curl curl
need iperf3 iperf3
need wrk wrk
need socat socat
need haproxy haproxy
need nginx nginx-light

for v in SECS ROUNDS REACTORS WRK_THREADS WRK_CONNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "PERF_$v must be a positive integer (got '${!v}')"
done
for n in $IPERF_STREAMS; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "PERF_IPERF_STREAMS must list positive integers (got '$n')"; done
[[ -z $PIPE_SIZE || $PIPE_SIZE =~ ^[1-9][0-9]*$ ]] || die "PERF_PIPE_SIZE must be bytes (got '$PIPE_SIZE')"
case $HAPROXY_SPLICE in auto | always | off) ;; *) die "PERF_HAPROXY_SPLICE must be auto, always or off" ;; esac
for row in $ROWS; do
    case $row in direct | ringtun-uring | ringtun-epoll | socat | haproxy) ;; *) die "unknown row '$row' in PERF_ROWS" ;; esac
done

TMP=$(mktemp -d /tmp/ringtun-perf.XXXXXX)

# ---------------------------------------------------------------- build
if [[ $NO_BUILD != 1 ]]; then
    log "cargo build --release (ringtun, tcp-load)"
    (cd "$REPO" && cargo build --release -p ringtun -p ringtun-perf-tools --bin ringtun --bin tcp-load) >"$TMP/build.log" 2>&1 \
        || { tail -40 "$TMP/build.log" >&2; die "cargo build --release failed"; }
fi
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory) \
    || die "cargo metadata failed"
RINGTUN="${PERF_RINGTUN:-$TARGET_DIR/release/ringtun}"
LOAD="$TARGET_DIR/release/tcp-load"
for b in "$RINGTUN" "$LOAD"; do
    [[ -x $b ]] || die "no binary at $b (build it, or unset PERF_NO_BUILD)"
done
# shellcheck source=perf/lib/loadtests.sh
source "$HERE/lib/loadtests.sh"
fail() { die "$*"; } # loadtests.sh reports a failed test through fail

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

wait_listen() { # wait_listen <netns> <addr:port or :port> <pid>: until a TCP listener exists
    local ns=$1 port=${2##*:} pid=$3 i
    for i in $(seq 200); do
        if nsx "$ns" ss -Hltn "sport = :$port" | grep -q .; then return 0; fi
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before listening on :$port in $ns"
        sleep 0.05
    done
    die "nothing listens on :$port in $ns after 10 s"
}

proc_ticks() { # utime+stime+cutime+cstime of one process (all its threads), 0 if gone
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    echo $((f[11] + f[12] + f[13] + f[14]))
}

cpu_ticks() { # cpu_ticks <pid...>: the processes and their live children (socat forks)
    local total=0 pid c
    for pid in "$@"; do
        total=$((total + $(proc_ticks "$pid")))
        for c in $(ps --ppid "$pid" -o pid= 2>/dev/null || true); do total=$((total + $(proc_ticks "$c"))); done
    done
    echo "$total"
}

settle() { # let forked per-connection children exit so their time lands in cutime/cstime
    local pid i
    for pid in "$@"; do
        for i in $(seq 100); do
            [[ -z $(ps --ppid "$pid" -o pid= 2>/dev/null || true) ]] && break
            sleep 0.05
        done
    done
}

calc() { awk "BEGIN { printf \"%s\", $* }"; }

# ---------------------------------------------------------------- topology
add_ns() {
    ip netns add "$1" || die "ip netns add $1 failed"
    NSES+=("$1")
    ip -n "$1" link set lo up
}

log "namespaces: $NODE (router) $CLI ($CLI_IP) $SRV ($SRV_IP)"
add_ns "$NODE"
nsx "$NODE" sysctl -qw net.ipv4.ip_forward=1
nsx "$NODE" sysctl -qw net.ipv6.conf.all.forwarding=1
for pair in "$CLI:1" "$SRV:4"; do
    ns=${pair%:*} i=${pair##*:}
    add_ns "$ns"
    ip -n "$NODE" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$NODE" addr add "10.77.$i.1/24" dev "v$i"
    ip -n "$NODE" addr add "fd77:$i::1/64" dev "v$i" nodad
    ip -n "$NODE" link set "v$i" up
    ip -n "$ns" addr add "10.77.$i.2/24" dev eth0
    ip -n "$ns" addr add "fd77:$i::2/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "10.77.$i.1"
    ip -n "$ns" -6 route add default via "fd77:$i::1"
done

# The connection-rate tests open tens of thousands of connections to one server port, and a
# transparent proxy's upstream connections leave the client's own address too: both the
# client's and the proxy's sockets end in TIME_WAIT on the client's ports. Let connect() reuse
# those (every row alike, as perf/hbone.sh does) instead of scanning a full range at each
# connect, from a range above every port this script listens on.
for ns in "$CLI" "$SRV" "$NODE"; do
    nsx "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
    nsx "$ns" sysctl -qw net.ipv4.ip_local_port_range="29000 65535"
done

# ---------------------------------------------------------------- servers (server namespace)
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen $SRV_IP:$HTTP_PORT reuseport;
        location / { default_type text/plain; return 200 "hello from the perf server\n"; }
    }
}
EOF
start_bg nginx "$SRV" nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_listen "$SRV" ":$HTTP_PORT" "$NGINX_PID"
start_bg iperf3-server "$SRV" iperf3 -s -B "$SRV_IP" -p "$IPERF_PORT"
IPERF_SRV_PID=$LAST_PID
wait_listen "$SRV" ":$IPERF_PORT" "$IPERF_SRV_PID"
start_bg echo-server "$SRV" "$LOAD" echo --listen "$SRV_IP:$ECHO_PORT"
wait_listen "$SRV" ":$ECHO_PORT" "$LAST_PID"
start_bg sink-server "$SRV" "$LOAD" sink --listen "$SRV_IP:$SINK_PORT"
wait_listen "$SRV" ":$SINK_PORT" "$LAST_PID"
code=$(nsx "$CLI" curl -s -o /dev/null -w '%{http_code}' "http://$SRV_IP:$HTTP_PORT/") || die "curl to nginx failed"
[[ $code == 200 ]] || die "nginx answered $code"

# ---------------------------------------------------------------- proxies
RINGTUN_CFG="$TMP/node.yaml"
{
    echo "version: 1"
    echo "node:"
    echo "  name: perf-node"
    echo "  reactors: $REACTORS"
    echo "  admin: off"
    echo "  metrics: $METRICS"
    echo "  readiness: $READY"
    [[ -n $PIPE_SIZE ]] && echo "  splice: {pipe_size: $PIPE_SIZE}"
    echo "workloads:"
    echo "  - name: client"
    echo "    namespace: default"
    echo "    ips: [$CLI_IP, \"$CLI_IP6\"]"
    echo "    node: perf-node"
    echo "    protocol: TCP"
    echo "    netns: /var/run/netns/$CLI"
    echo "services: []"
} >"$RINGTUN_CFG"
"$RINGTUN" check-config "$RINGTUN_CFG" >/dev/null || die "generated ringtun config is invalid: $RINGTUN_CFG"

case $HAPROXY_SPLICE in
    auto) HA_SPLICE="    option splice-auto" ;;
    always) HA_SPLICE=$'    option splice-request\n    option splice-response' ;;
    off) HA_SPLICE="" ;;
esac
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread $REACTORS
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
$HA_SPLICE
frontend iperf
    bind 127.0.0.1:$PROXY_IPERF_PORT
    default_backend iperf
backend iperf
    server s1 $SRV_IP:$IPERF_PORT
frontend http
    bind 127.0.0.1:$PROXY_HTTP_PORT
    default_backend http
backend http
    server s1 $SRV_IP:$HTTP_PORT
frontend echo
    bind 127.0.0.1:$PROXY_ECHO_PORT
    default_backend echo
backend echo
    server s1 $SRV_IP:$ECHO_PORT
frontend sink
    bind 127.0.0.1:$PROXY_SINK_PORT
    default_backend sink
backend sink
    server s1 $SRV_IP:$SINK_PORT
EOF
haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejected $TMP/haproxy.cfg"

metric() { # metric <name> [label text]: sum of a ringtun metric's samples
    nsx "$NODE" curl -sf "http://$METRICS/metrics" |
        awk -v n="$1" -v l="${2:-}" '$0 !~ /^#/ && (index($0, n "{") == 1 || index($0, n " ") == 1) && (l == "" || index($0, l)) { s += $NF } END { printf "%.0f", s }'
}

# Sets: PROXY_PIDS (CPU is measured on these), IPERF_HOST/PORT, HTTP_URL, ECHO_ADDR/SINK_ADDR
# (empty for socat: no tcp-load tests)
start_row() {
    local row=$1 round=$2 driver
    PROXY_PIDS=()
    ECHO_ADDR=$SRV_IP:$ECHO_PORT SINK_ADDR=$SRV_IP:$SINK_PORT
    case $row in
        direct)
            IPERF_HOST=$SRV_IP IPERF_DST_PORT=$IPERF_PORT HTTP_URL="http://$SRV_IP:$HTTP_PORT/"
            ;;
        ringtun-uring | ringtun-epoll)
            driver=io-uring
            [[ $row == ringtun-epoll ]] && driver=epoll
            "$RINGTUN" redirect install --netns "$CLI" --config "$RINGTUN_CFG" >"$TMP/redirect-install.log" 2>&1 \
                || { cat "$TMP/redirect-install.log" >&2; die "ringtun redirect install failed"; }
            start_bg "ringtun-$driver-$round" "$NODE" "$RINGTUN" run --config "$RINGTUN_CFG" --driver "$driver" --reactors "$REACTORS"
            PROXY_PIDS=("$LAST_PID")
            local i ok=0
            for i in $(seq 200); do
                if nsx "$NODE" curl -sf -o /dev/null "http://$READY/healthz/ready"; then ok=1; break; fi
                kill -0 "$LAST_PID" 2>/dev/null || { cat "$TMP/ringtun-$driver-$round.log" >&2; die "ringtun exited during startup"; }
                sleep 0.05
            done
            [[ $ok == 1 ]] || die "ringtun not ready after 10 s (log: $TMP/ringtun-$driver-$round.log)"
            wait_listen "$CLI" ":15001" "$LAST_PID"
            [[ $(cat "/proc/$LAST_PID/comm") == ringtun ]] || die "pid $LAST_PID is not ringtun"
            local want=${driver/-/_}
            [[ $(metric ringtun_driver_info "driver=\"$want\"") -ge 1 ]] \
                || die "ringtun did not start the $want driver: $(metric ringtun_driver_info)"
            IPERF_HOST=$SRV_IP IPERF_DST_PORT=$IPERF_PORT HTTP_URL="http://$SRV_IP:$HTTP_PORT/"
            ;;
        socat)
            start_bg "socat-iperf-$round" "$CLI" socat "TCP-LISTEN:$PROXY_IPERF_PORT,bind=127.0.0.1,fork,reuseaddr,backlog=1024" "TCP:$SRV_IP:$IPERF_PORT"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$CLI" ":$PROXY_IPERF_PORT" "$LAST_PID"
            start_bg "socat-http-$round" "$CLI" socat "TCP-LISTEN:$PROXY_HTTP_PORT,bind=127.0.0.1,fork,reuseaddr,backlog=1024" "TCP:$SRV_IP:$HTTP_PORT"
            PROXY_PIDS+=("$LAST_PID")
            wait_listen "$CLI" ":$PROXY_HTTP_PORT" "$LAST_PID"
            IPERF_HOST=127.0.0.1 IPERF_DST_PORT=$PROXY_IPERF_PORT HTTP_URL="http://127.0.0.1:$PROXY_HTTP_PORT/"
            ECHO_ADDR="" SINK_ADDR=""
            ;;
        haproxy)
            start_bg "haproxy-$round" "$CLI" haproxy -db -f "$TMP/haproxy.cfg"
            PROXY_PIDS=("$LAST_PID")
            wait_listen "$CLI" ":$PROXY_IPERF_PORT" "$LAST_PID"
            wait_listen "$CLI" ":$PROXY_HTTP_PORT" "$LAST_PID"
            wait_listen "$CLI" ":$PROXY_ECHO_PORT" "$LAST_PID"
            wait_listen "$CLI" ":$PROXY_SINK_PORT" "$LAST_PID"
            IPERF_HOST=127.0.0.1 IPERF_DST_PORT=$PROXY_IPERF_PORT HTTP_URL="http://127.0.0.1:$PROXY_HTTP_PORT/"
            ECHO_ADDR=127.0.0.1:$PROXY_ECHO_PORT SINK_ADDR=127.0.0.1:$PROXY_SINK_PORT
            ;;
    esac
}

stop_row() {
    local row=$1 pid
    for pid in "${PROXY_PIDS[@]}"; do stop_pid "$pid"; done
    if [[ $row == ringtun-* ]]; then
        "$RINGTUN" redirect remove --netns "$CLI" --config "$RINGTUN_CFG" >"$TMP/redirect-remove.log" 2>&1 \
            || { cat "$TMP/redirect-remove.log" >&2; die "ringtun redirect remove failed"; }
    fi
    # Nothing of this row may be left listening for the next one.
    for p in 15001 15006 "$PROXY_IPERF_PORT" "$PROXY_HTTP_PORT" "$PROXY_ECHO_PORT" "$PROXY_SINK_PORT"; do
        nsx "$CLI" ss -Hltn "sport = :$p" | grep -q . && die "port $p still listening after stopping $row"
    done
    return 0
}

proxy_cpu() { # proxy CPU ticks now (0 for direct)
    if [[ ${#PROXY_PIDS[@]} -eq 0 ]]; then echo 0; else cpu_ticks "${PROXY_PIDS[@]}"; fi
}

declare -A R   # R[row:metric:round] = value

run_iperf() { # run_iperf <row> <round> <fwd|rev> [streams]: R keys fwd/rev for 1 stream, fwd-P4 etc.
    local row=$1 round=$2 dir=$3 p=${4:-1} key=$3 t0 t1 flag=() err json
    [[ $p == 1 ]] || key=$dir-P$p
    json="$TMP/iperf-$1-$key-$2.json"
    flag=(-P "$p")
    [[ $dir == rev ]] && flag+=(-R)
    [[ ${#PROXY_PIDS[@]} -gt 0 ]] && settle "${PROXY_PIDS[@]}"
    t0=$(proxy_cpu)
    if ! timeout $((SECS + 60)) ip netns exec "$CLI" iperf3 -c "$IPERF_HOST" -p "$IPERF_DST_PORT" -t "$SECS" -J "${flag[@]}" >"$json" 2>"$json.err"; then
        err=$(jq -r '.error // empty' "$json" 2>/dev/null || true)
        die "iperf3 $dir through $row failed: ${err:-$(cat "$json.err")}"
    fi
    [[ ${#PROXY_PIDS[@]} -gt 0 ]] && settle "${PROXY_PIDS[@]}"
    t1=$(proxy_cpu)
    iperf_record plain "$row" "$round" "$key" "$dir-P$p" "$json" "$t0" "$t1"
    log "  iperf3 $key: $(printf '%.2f' "${R[$row:$key.gbps:$round]}") Gbit/s, proxy CPU ${R[$row:$key.cpu:$round]} s"
}

run_wrk() { # run_wrk <row> <round>
    local row=$1 round=$2 out="$TMP/wrk-$1-$2.txt" t0 t1
    [[ ${#PROXY_PIDS[@]} -gt 0 ]] && settle "${PROXY_PIDS[@]}"
    t0=$(proxy_cpu)
    timeout $((SECS + 60)) ip netns exec "$CLI" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${SECS}s" --latency "$HTTP_URL" >"$out" 2>&1 \
        || { cat "$out" >&2; die "wrk through $row failed"; }
    [[ ${#PROXY_PIDS[@]} -gt 0 ]] && settle "${PROXY_PIDS[@]}"
    t1=$(proxy_cpu)
    local rps reqs p50 p99 errs non2xx
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    reqs=$(awk '/requests in/ { print $1 }' "$out")
    p50=$(awk '$1 == "50%" { print $2 }' "$out")
    p99=$(awk '$1 == "99%" { print $2 }' "$out")
    errs=$(awk '/Socket errors:/ { s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i; print s }' "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
    [[ -n $rps && -n $reqs ]] || { cat "$out" >&2; die "cannot read wrk output ($out)"; }
    [[ ${reqs} -gt 0 ]] || die "wrk through $row completed no request"
    R[$row:wrk.rps:$round]=$rps
    R[$row:wrk.reqs:$round]=$reqs
    R[$row:wrk.p50:$round]=${p50:-?}
    R[$row:wrk.p99:$round]=${p99:-?}
    R[$row:wrk.errors:$round]=$((${errs:-0} + ${non2xx:-0}))
    R[$row:wrk.cpu:$round]=$(calc "($t1 - $t0) / $HZ")
    csv_add plain "$row" "$round" wrk "c$WRK_CONNS" req_per_sec "$rps"
    csv_add plain "$row" "$round" wrk "c$WRK_CONNS" requests "$reqs"
    csv_add plain "$row" "$round" wrk "c$WRK_CONNS" errors "${R[$row:wrk.errors:$round]}"
    csv_add plain "$row" "$round" wrk "c$WRK_CONNS" cpu_s "${R[$row:wrk.cpu:$round]}"
    log "  wrk: $rps req/s (p99 ${p99:-?}), proxy CPU ${R[$row:wrk.cpu:$round]} s, errors ${R[$row:wrk.errors:$round]}"
}

# ---------------------------------------------------------------- run
log "ringtun $("$RINGTUN" --version 2>/dev/null | awk '{print $2}') ($RINGTUN), reactors $REACTORS, ${SECS}s per test, $ROUNDS round(s): $ROWS"
for round in $(seq "$ROUNDS"); do
    for row in $ROWS; do
        log "round $round/$ROUNDS: $row"
        start_row "$row" "$round"
        if [[ $row == ringtun-* ]]; then before=$(metric ringtun_splice_bytes_to_upstream_total); fi
        run_iperf "$row" "$round" fwd
        if [[ $row == ringtun-* ]]; then
            after=$(metric ringtun_splice_bytes_to_upstream_total)
            moved=$((after - before))
            [[ $moved -ge ${R[$row:fwd.bytes:$round]} ]] \
                || die "$row: ringtun spliced only $moved bytes upstream, iperf3 received ${R[$row:fwd.bytes:$round]} — traffic bypassed the proxy?"
        fi
        [[ $REVERSE == 1 ]] && run_iperf "$row" "$round" rev
        for p in $IPERF_STREAMS; do
            [[ $p == 1 ]] && continue
            run_iperf "$row" "$round" fwd "$p"
            [[ $REVERSE == 1 ]] && run_iperf "$row" "$round" rev "$p"
        done
        run_wrk "$row" "$round"
        if [[ -n $ECHO_ADDR ]]; then
            loadtests plain "$row" "$round"
        elif [[ -n ${PERF_RATE_LIST:-}${PERF_OPEN_RATES:-}${PERF_BULK_FLOWS:-} ]]; then
            log "  (no tcp-load tests through $row)"
        fi
        if [[ $row == ringtun-* ]]; then
            nsx "$NODE" curl -sf "http://$METRICS/metrics" >"$TMP/metrics-$row-$round.txt" || true
        fi
        stop_row "$row"
    done
done

# ---------------------------------------------------------------- report
median() { # median of the per-round values of R[row:metric:*]
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
    [direct]="direct (no proxy)"
    [ringtun-uring]="ringtun io_uring"
    [ringtun-epoll]="ringtun epoll"
    [socat]="socat (fork)"
    [haproxy]="HAProxy (splice-$HAPROXY_SPLICE)"
)

# per-row figures
declare -A F
for row in $ROWS; do
    F[$row:fwd]=$(median "$row" fwd.gbps)
    F[$row:rev]=$([[ $REVERSE == 1 ]] && median "$row" rev.gbps || true)
    F[$row:rps]=$(median "$row" wrk.rps)
    if [[ $row == direct ]]; then
        F[$row:cpugb]="" F[$row:cpureq]=""
    else
        cpu=$(sum "$row" fwd.cpu rev.cpu) bytes=$(sum "$row" fwd.bytes rev.bytes)
        F[$row:cpugb]=$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { if (b > 0) printf "%.3f", c / (b / 1e9) }')
        cpu=$(sum "$row" wrk.cpu) reqs=$(sum "$row" wrk.reqs)
        F[$row:cpureq]=$(awk -v c="$cpu" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", c * 1e6 / n }')
    fi
done
D_FWD=${F[direct:fwd]:-} D_REV=${F[direct:rev]:-} D_RPS=${F[direct:rps]:-}

STAMP=$(date +%Y-%m-%dT%H%M%S)
GITREV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
(cd "$REPO" && git diff --quiet HEAD -- src Cargo.toml 2>/dev/null) || GITREV="$GITREV+dirty"
HEAD_MD="| path | iperf3 Gbit/s | × direct | iperf3 -R Gbit/s | × direct | wrk req/s | × direct | proxy CPU-s/GB (iperf3) | proxy CPU µs/req (wrk) |"
SEP_MD="|---|---:|---:|---:|---:|---:|---:|---:|---:|"
TABLE_MD="$HEAD_MD"$'\n'"$SEP_MD"
TABLE_TXT="path|iperf3_Gbit/s|x_direct|iperf3_-R_Gbit/s|x_direct|wrk_req/s|x_direct|CPU-s/GB|CPU_us/req"
for row in $ROWS; do
    cells=(
        "${LABEL[$row]}"
        "$(fmt 2 "${F[$row:fwd]}")" "$(ratio "${F[$row:fwd]}" "$D_FWD")"
        "$(fmt 2 "${F[$row:rev]}")" "$(ratio "${F[$row:rev]}" "$D_REV")"
        "$(fmt 0 "${F[$row:rps]}")" "$(ratio "${F[$row:rps]}" "$D_RPS")"
        "$(fmt 3 "${F[$row:cpugb]}")" "$(fmt 1 "${F[$row:cpureq]}")"
    )
    line="|"
    for c in "${cells[@]}"; do line+=" $c |"; done
    TABLE_MD+=$'\n'"$line"
    TABLE_TXT+=$'\n'"$(IFS='|'; echo "${cells[*]// /_}")"
done

DETAILS_MD="| path | round | test | Gbit/s or req/s | GB moved / requests | retransmits / errors | wrk p50 / p99 | proxy CPU s |"$'\n'"|---|---:|---|---:|---:|---:|---|---:|"
for row in $ROWS; do
    for r in $(seq "$ROUNDS"); do
        for dir in fwd rev; do
            [[ -n ${R[$row:$dir.gbps:$r]:-} ]] || continue
            DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | iperf3 $dir | $(fmt 2 "${R[$row:$dir.gbps:$r]}") | $(calc "${R[$row:$dir.bytes:$r]} / 1e9") | ${R[$row:$dir.retr:$r]} | | ${R[$row:$dir.cpu:$r]} |"
        done
        DETAILS_MD+=$'\n'"| ${LABEL[$row]} | $r | wrk | $(fmt 0 "${R[$row:wrk.rps:$r]}") | ${R[$row:wrk.reqs:$r]} | ${R[$row:wrk.errors:$r]} | ${R[$row:wrk.p50:$r]} / ${R[$row:wrk.p99:$r]} | ${R[$row:wrk.cpu:$r]} |"
    done
done

VERDICT=""
if [[ -n ${F[ringtun-uring:fwd]:-} && -n $D_FWD ]]; then
    rt=$(ratio "${F[ringtun-uring:fwd]}" "$D_FWD")
    v=$(awk -v r="$rt" 'BEGIN { print (r >= 0.6) ? "MET" : "MISSED" }')
    VERDICT+="- target ringtun io_uring iperf3 ≥ 0.6 × direct: **$v** ($rt)"$'\n'
fi
if [[ -n ${F[ringtun-uring:cpugb]:-} && -n ${F[haproxy:cpugb]:-} ]]; then
    v=$(awk -v a="${F[ringtun-uring:cpugb]}" -v b="${F[haproxy:cpugb]}" 'BEGIN { print (a < b) ? "MET" : "MISSED" }')
    VERDICT+="- target ringtun io_uring CPU-s/GB below HAProxy's: **$v** (${F[ringtun-uring:cpugb]} vs ${F[haproxy:cpugb]})"$'\n'
fi

REPORT="# ringtun perf comparison — $STAMP

- ringtun $GITREV, $(uname -sr), $(nproc) cores, ${SECS}s per test, $ROUNDS round(s) (median shown)
- reactors / HAProxy nbthread: $REACTORS; ringtun splice.pipe_size: ${PIPE_SIZE:-default}; HAProxy splice: $HAPROXY_SPLICE
- iperf3 single stream (\`-t $SECS\`, and \`-R\`); wrk \`-t$WRK_THREADS -c$WRK_CONNS -d${SECS}s\` against nginx ($NGINX_WORKERS workers), small static body
- topology: client ns → veth → router ns → veth → server ns; proxies run for the client (ringtun: capture rules + pod-mode listeners in the client ns; socat/HAProxy: explicit, on the client's 127.0.0.1)
- proxy CPU = utime+stime (+ children for socat) from /proc during each test; CPU-s/GB and µs/req are totals over all rounds (both iperf3 directions), the other figures medians

$TABLE_MD

$VERDICT
## Details

$DETAILS_MD
"
mkdir -p "$REPO/perf/results"
OUT="$REPO/perf/results/$STAMP.md"
printf '%s' "$REPORT" >"$OUT"

echo
echo "$TABLE_TXT" | column -t -s '|' | sed 's/_/ /g'
echo
printf '%s' "$REPORT"
log "written: $OUT"
