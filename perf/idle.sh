#!/usr/bin/env bash
# Idle flows: resident memory and descriptors per open, idle connection on both nodes, plain
# and through an HBONE tunnel, at 1,000 and 9,000 connections (IDLE_COUNTS). Writes
# perf/results/idle-<time>.csv and prints one line per kind, count and node. See
# tests/idle_flows.rs for how it measures and perf/README.md for reading it.
#
#   sudo perf/idle.sh                      # 1,000 and 9,000
#   sudo IDLE_COUNTS="500" perf/idle.sh    # a quick look
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$(id -u)" != 0 ]; then
    echo "idle.sh: must run as root (network namespaces)" >&2
    exit 1
fi
stamp=$(date -u +%Y-%m-%dT%H%M%S)
mkdir -p "$root/perf/results"
cd "$root"
# One access record per connection would be 18,000 lines per count: warnings only. perf/run
# passes IDLE_CSV to collect the CSV into its own results.
RINGTUN_LOG=warn IDLE_CSV="${IDLE_CSV:-$root/perf/results/idle-$stamp.csv}" \
    cargo test --release --test idle_flows -- --ignored --nocapture idle_flow_cost
