# shellcheck shell=bash
# perf/lib/loadtests.sh — the tests perf/run adds to a suite's rows, and the result recording
# shared by perf/compare.sh (plain TCP) and perf/hbone.sh (HBONE). Sourced, not run. Every
# result is one CSV line:
#
#   suite,row,round,test,param,metric,value
#
# The sourcing script provides: nsx, calc, fail, proxy_cpu (CPU ticks of the row's proxy
# processes), HZ, TMP, SECS, CLI (the client namespace), LOAD (tcp-load), and per row
# ECHO_ADDR / SINK_ADDR (where the client reaches the echo and sink servers through the row).
#
# Environment (empty: the test is not run):
#   PERF_CSV=                file the CSV lines are appended to (nothing is written when unset)
#   PERF_RATE_LIST=          tcp-load rate at each of these concurrencies ("1 32 256")
#   PERF_OPEN_RATES=         tcp-load open-loop at each of these exchanges/s ("1000 10000")
#   PERF_OPEN_CONNECTIONS=16 connections the open-loop rate is spread over
#   PERF_BULK_FLOWS=         tcp-load bulk with each of these flow counts ("1 10 100 1000")

csv_add() { # csv_add <suite> <row> <round> <test> <param> <metric> <value>
    [[ -n ${PERF_CSV:-} && -n ${7:-} && $7 != null ]] || return 0
    printf '%s,%s,%s,%s,%s,%s,%s\n' "$@" >>"$PERF_CSV"
}

# loadtest <suite> <row> <round> <mode> <param> <tcp-load args...>: one tcp-load run in the
# client namespace, the proxy's CPU around it; the JSON's numbers go to the CSV.
loadtest() {
    local suite=$1 row=$2 round=$3 mode=$4 param=$5 json t0 t1 cpu key
    shift 5
    json="$TMP/loadtest-$row-$mode-$param-$round.json"
    t0=$(proxy_cpu)
    if ! timeout $((SECS + 90)) ip netns exec "$CLI" "$LOAD" "$mode" "$@" --duration "$SECS" >"$json" 2>"$json.err"; then
        fail "tcp-load $mode $param: $(tail -n 1 "$json.err")"
        return 1
    fi
    t1=$(proxy_cpu)
    cpu=$(calc "($t1 - $t0) / $HZ")
    csv_add "$suite" "$row" "$round" "$mode" "$param" cpu_s "$cpu"
    for key in $(jq -r 'to_entries[] | select(.value | type == "number") | .key' "$json"); do
        csv_add "$suite" "$row" "$round" "$mode" "$param" "$key" "$(jq -r ".$key" "$json")"
    done
    log "  tcp-load $mode $param: $(jq -c 'del(.first_error, .mode)' "$json"), proxy CPU $cpu s"
}

# loadtests <suite> <row> <round>: every test the PERF_* lists ask for, on the current row.
loadtests() {
    local suite=$1 row=$2 round=$3 n
    for n in ${PERF_RATE_LIST:-}; do
        loadtest "$suite" "$row" "$round" rate "$n" --target "$ECHO_ADDR" --concurrency "$n" --bytes 1024 || return 1
    done
    for n in ${PERF_OPEN_RATES:-}; do
        loadtest "$suite" "$row" "$round" open-loop "$n" --target "$ECHO_ADDR" --rate "$n" \
            --connections "${PERF_OPEN_CONNECTIONS:-16}" --bytes 1024 || return 1
    done
    for n in ${PERF_BULK_FLOWS:-}; do
        loadtest "$suite" "$row" "$round" bulk "$n" --target "$SINK_ADDR" --flows "$n" --bytes 65536 || return 1
    done
}

# iperf_record <suite> <row> <round> <key> <param> <json> <cpu ticks before> <after>: an
# iperf3 run's results into the caller's R[row:key.{gbps,bytes,retr,cpu}:round] and the CSV
# (param names the test: fwd-P1, rev-P4, ...).
# shellcheck disable=SC2004 # R is the caller's associative array: its keys are strings
iperf_record() {
    local suite=$1 row=$2 round=$3 key=$4 param=$5 json=$6 m
    R[$row:$key.gbps:$round]=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$json")
    R[$row:$key.bytes:$round]=$(jq -r '.end.sum_received.bytes' "$json")
    R[$row:$key.retr:$round]=$(jq -r '.end.sum_sent.retransmits // 0' "$json")
    R[$row:$key.cpu:$round]=$(calc "($8 - $7) / $HZ")
    for m in gbps bytes retr; do csv_add "$suite" "$row" "$round" iperf3 "$param" "$m" "${R[$row:$key.$m:$round]}"; done
    csv_add "$suite" "$row" "$round" iperf3 "$param" cpu_s "${R[$row:$key.cpu:$round]}"
}
