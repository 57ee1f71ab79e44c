#!/usr/bin/env bash
# Soak: mixed traffic (bulk, request/response, connection churn, periodic handshake floods)
# through two ringtun nodes for SECONDS, sampling each node's memory, descriptors and CPU and
# the traffic's outcomes every second into perf/results/soak-<time>.csv, drawn as a chart
# beside it (.svg). Fails on any byte error or failed exchange, or if descriptors do not
# return to their baseline. See tests/soak.rs for the traffic and perf/README.md for reading it.
#
#   sudo perf/soak.sh 3600      # an hour (default 60 s)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-60}"
if [ "$(id -u)" != 0 ]; then
    echo "soak.sh: must run as root (network namespaces)" >&2
    exit 1
fi
stamp=$(date -u +%Y-%m-%dT%H%M%S)
csv="$root/perf/results/soak-$stamp.csv"
mkdir -p "$root/perf/results"
# Access records at info level would be one line per connection for hours: warnings only.
cd "$root"
RINGTUN_LOG=warn SOAK_SECS="$secs" SOAK_CSV="$csv" cargo test --release --test soak -- \
    --ignored --nocapture soak
"$root/perf/tools/soak_chart.py" "$csv"
echo "soak: $csv"
