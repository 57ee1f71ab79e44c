#!/usr/bin/env bash
# Kernel matrix runner: boots Debian's cloud kernels (5.10 to 7.x) under qemu (TCG) with a
# busybox initramfs, two at a time on a 2-core host, and runs inside, with kTLS loaded where the
# kernel has it: ringtun's kernel-facing lib tests, `ringtun probe` against independent oracles
# (tests/probe_cli.rs), the two-node HBONE end-to-end tests (tests/hbone_e2e.rs) and the
# kernel-aware checks (tests/kernel_matrix.rs); then, with kernel.io_uring_disabled=2 where the
# sysctl exists, the same checks on the driver ringtun picks by itself and the epoll end-to-end
# tests. Reports the results on the host, writes the matrix table to tests/kernels/MATRIX.md and
# the README. See tests/kernels/README.md.
#
#   sudo tests/kernels/run.sh            # every suite in RINGTUN_VM_SUITES
#
# Environment:
#   RINGTUN_VM_SUITES    Debian suites to boot (default "bullseye bookworm trixie
#                        trixie-backports": 5.10, 6.1, 6.12, 7.x); the first is required, the
#                        others are skipped with a warning when unreachable and not cached
#   RINGTUN_VM_E2E       1 (default): also the end-to-end tests; 0: only the lib tests
#   RINGTUN_VM_FILTERS   lib test filters (default "tls::ktls tls::tests kernel_features")
#   RINGTUN_VM_PROBE     probe_cli tests (default: the JSON keys and the kTLS oracles)
#   RINGTUN_VM_HBONE     hbone_e2e tests with kTLS (default: a small-data subset, see below)
#   RINGTUN_VM_KM        kernel_matrix tests (default: every root test but the io_uring
#                        byte-order variant; hbone_e2e's record-budget test covers io_uring)
#   RINGTUN_VM_INTEROP   hbone_interop tests (default: the two h2-crate peers against ringtun)
#                        (these test lists: set to "" to run none)
#   RINGTUN_VM_REPEAT    run each test this many times (default 1; for hunting flakes)
#   RINGTUN_VM_TEST_ENV  "NAME=value ..." set for every test inside the VM
#   RINGTUN_VM_NOURING_E2E  "<binary>:<test>" list run with io_uring disabled (default below)
#   RINGTUN_VM_REQUIRE_CIPHERS  ciphers that must each carry a kTLS tunnel where the kernel
#                        accepts them (default "aes_128_gcm aes_256_gcm"; "" for none)
#   RINGTUN_VM_PARALLEL  VMs booted at a time (default: the host's cores; each VM keeps about
#                        0.7 of a core busy, so two share a 2-core host well)
#   RINGTUN_VM_SMALL_PLAN  suites that run the smaller plan (default "trixie-backports", the
#                        slowest; "" for none): see write_plan below
#   RINGTUN_VM_TIMEOUT   seconds one VM may run (default 720)
#   RINGTUN_VM_BUDGET    seconds the whole run may take, build included (default 1380: inside
#                        CI's 24 minutes); a VM is cut off when it would overrun
#   RINGTUN_VM_CPUS      vCPUs per VM (default 2; TCG runs one host thread per vCPU)
#   RINGTUN_VM_REFRESH   1: refresh the private apt lists now (otherwise at most every 6 h)
#   RINGTUN_VM_CACHE     cache and output directory (default target/kernels)
#   RINGTUN_VM_DOCS      1 (default): write tests/kernels/MATRIX.md and the README's table;
#                        0: only target/kernels/results.md (CI)
# Exit status: 0 only if every VM booted, printed its DONE marker and every test and check passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/kernels
start_time=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "run.sh: must run as root (apt, mknod for the initramfs)" >&2
    exit 1
fi

suites=${RINGTUN_VM_SUITES:-bullseye bookworm trixie trixie-backports}
timeout_s=${RINGTUN_VM_TIMEOUT:-720}
budget_s=${RINGTUN_VM_BUDGET:-1380}
cpus=${RINGTUN_VM_CPUS:-2}
parallel=${RINGTUN_VM_PARALLEL:-$(nproc)}
small_plan=${RINGTUN_VM_SMALL_PLAN-trixie-backports}
cache=${RINGTUN_VM_CACHE:-target/kernels}
e2e=${RINGTUN_VM_E2E:-1}
docs=${RINGTUN_VM_DOCS:-1}
lib_filters=${RINGTUN_VM_FILTERS:-tls::ktls tls::tests kernel_features}
# Small data only: TCG runs these 20-50x slower than the host. The 1 GiB and 200-connection
# tests stay on the host.
hbone_tests=${RINGTUN_VM_HBONE-io_uring::bytes_cross_two_nodes_intact io_uring::client_half_close_maps_to_end_stream io_uring::upstream_reset_reaches_client_as_reset io_uring::record_budget_retires_tunnels_without_losing_bytes io_uring::wrong_server_identity_is_refused_by_the_client io_uring::a_stream_waiting_for_credit_sleeps io_uring::idle_streams_hold_their_socket_and_no_pipe io_uring::streams_beyond_the_pipe_budget_copy_every_byte epoll::bytes_cross_two_nodes_intact}
# tests/kernel_matrix.rs: ringtun's own choices against kernel oracles, TLS records only an
# independent peer sends (NewSessionTicket, KeyUpdate), and byte order across retirements.
km_tests=${RINGTUN_VM_KM-auto_driver_follows_the_kernel_and_serves hbone_tunnel_tls_follows_the_kernel new_session_tickets_from_the_peer_do_not_break_the_tunnel peer_key_update_never_corrupts_or_truncates_silently record_budget_retirement_keeps_every_byte_in_order_epoll record_budget_retirement_keeps_every_byte_in_order_copied_payload}
# tests/probe_cli.rs: `ringtun probe --json` against the test's own kTLS key installs and the
# kernel's rekey counters (they only say something where the kernel has kTLS).
probe_tests=${RINGTUN_VM_PROBE-json_report_has_every_key_with_its_type ktls_agrees_with_the_kernels_ulp_list ktls_ciphers_per_direction_match_our_own_key_installs ktls_rekey_agrees_with_the_kernels_own_counters}
# The h2-crate peers of tests/hbone_interop.rs (the Python ones need python3-h2, not in the VM).
interop_tests=${RINGTUN_VM_INTEROP-h2_crate_client_gets_200_and_a_byte_stream_from_ringtun_15008 ringtun_tunnel_is_accepted_by_an_h2_crate_server}
# With io_uring disabled the io_uring:: variants fail by design (they force the driver): the
# auto-driver check, then epoll variants.
nouring_e2e=${RINGTUN_VM_NOURING_E2E-kernel_matrix:auto_driver_follows_the_kernel_and_serves kernel_matrix:hbone_tunnel_tls_follows_the_kernel netns_e2e:epoll::client_half_close_keeps_server_direction_open netns_e2e:epoll::server_reset_reaches_client_as_reset hbone_e2e:epoll::client_half_close_maps_to_end_stream}
# Ciphers that must each carry a kTLS tunnel where the kernel accepts them ("" for none).
require_ciphers=${RINGTUN_VM_REQUIRE_CIPHERS-aes_128_gcm aes_256_gcm}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# 1. Tools.
export DEBIAN_FRONTEND=noninteractive
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v strip >/dev/null || need+=(binutils)
command -v python3 >/dev/null || need+=(python3)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
# The end-to-end tests' tools are copied from the host into the VM.
command -v iptables-nft >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v sysctl >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    ok=0
    for attempt in 1 2 3; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
            ok=1
            break
        fi
        echo "run.sh: apt-get failed (attempt $attempt of 3); retrying in $((attempt * 10)) s" >&2
        sleep $((attempt * 10))
    done
    [ "$ok" = 1 ] || { echo "run.sh: cannot install ${need[*]}" >&2; exit 1; }
fi

# 2. Kernels.
kernels=()
first=1
for suite in $suites; do
    rc=0
    line=$("$here/fetch-kernel.sh" "$suite" "$cache") || rc=$?
    if [ "$rc" != 0 ]; then
        if [ "$first" = 1 ]; then
            echo "run.sh: cannot get the $suite kernel (required)" >&2
            exit 1
        fi
        echo "run.sh: WARNING: skipping $suite (no kernel package reachable or cached)" >&2
    else
        kernels+=("$suite ${line}")
    fi
    first=0
done

# 3. ringtun's binaries, built on the host: one cargo call (the test profile) names the lib
# test binary, the integration test binaries and the `ringtun` they run (CARGO_BIN_EXE_ringtun).
# They are copied at once, so a later build in the same target dir cannot change them mid-run.
echo "== building ringtun test binaries"
artifacts=$(mktemp)
trap 'rm -f "$artifacts"' EXIT
cargo test --workspace --no-run --message-format=json >"$artifacts"
bins=$cache/bin
rm -rf "$bins"
mkdir -p "$bins"
# Prints "<kind> <name> <executable>" for the ringtun package's lib tests, integration tests and bin.
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    t = j.get("target") or {}
    if j.get("reason") != "compiler-artifact" or not j.get("executable"):
        continue
    kinds = t.get("kind", [])
    if "lib" in kinds and j.get("profile", {}).get("test") and t.get("name") == "ringtun":
        print("libtest", t["name"], j["executable"])
    elif "test" in kinds:
        print("test", t["name"], j["executable"])
    elif "bin" in kinds and t.get("name") == "ringtun" and not j.get("profile", {}).get("test"):
        print("bin", t["name"], j["executable"])
' "$artifacts" >"$artifacts.list"
test_bin=$(awk '$1 == "libtest" { print $3 }' "$artifacts.list" | tail -n1)
ringtun_path=$(awk '$1 == "bin" { print $3 }' "$artifacts.list" | tail -n1)
e2e_bins=()
if [ "$e2e" = 1 ]; then
    for t in hbone_e2e netns_e2e kernel_matrix hbone_interop probe_cli; do
        exe=$(awk -v t="$t" '$1 == "test" && $2 == t { print $3 }' "$artifacts.list" | tail -n1)
        [ -n "$exe" ] || { echo "run.sh: cargo built no $t test binary" >&2; exit 1; }
        cp "$exe" "$bins/$t"
        e2e_bins+=("$bins/$t")
    done
fi
rm -f "$artifacts.list"
if [ -z "$test_bin" ] || [ -z "$ringtun_path" ]; then
    echo "run.sh: could not find the ringtun lib test binary ($test_bin) or ringtun ($ringtun_path)" >&2
    exit 1
fi
cp "$test_bin" "$bins/ringtun-lib-tests"
cp "$ringtun_path" "$bins/ringtun"
if [ "$e2e" = 1 ] && ! grep -qF "$ringtun_path" "$bins/hbone_e2e"; then
    echo "run.sh: hbone_e2e does not run $ringtun_path; cannot place ringtun where it looks" >&2
    exit 1
fi
echo "   lib tests: $test_bin"
echo "   ringtun:   $ringtun_path (the integration tests run it from there; the VM has it there too)"

# AES-256-GCM is carried by a test that pins it (node.hbone.cipher); it joins the default list
# as soon as hbone_e2e has it.
if [ "$e2e" = 1 ] && [ -z "${RINGTUN_VM_HBONE+set}" ]; then
    pinned=io_uring::pinned_aes_256_gcm_carries_bytes
    listed=$("$bins/hbone_e2e" --list --format=terse 2>/dev/null || true)
    if grep -qx "$pinned: test" <<<"$listed"; then
        hbone_tests="$hbone_tests $pinned"
    else
        echo "run.sh: WARNING: hbone_e2e has no $pinned; no tunnel will pin AES-256-GCM" >&2
    fi
fi

# The plans inside the VMs (format: init.sh). The smaller plan, for the slowest kernels in
# RINGTUN_VM_SMALL_PLAN, leaves out what another kernel of the matrix already proves the same
# way: the h2-crate interop peers (kernel_matrix's independent rustls/h2 peers run on every
# kernel), the wrong-identity handshake (refused before any kTLS) and, with io_uring disabled,
# the end-to-end tests (6.12 runs them; the probe and lib tests with the sysctl still run).
write_plan() { # small (0|1)
    local hbone=$hbone_tests interop=$interop_tests nouring=$nouring_e2e
    if [ "$1" = 1 ]; then
        hbone=$(tr ' ' '\n' <<<"$hbone" | grep -vx 'io_uring::wrong_server_identity_is_refused_by_the_client' | paste -sd' ' -)
        interop=
        nouring=
    fi
    echo "main - /bin/ringtun-lib-tests $lib_filters"
    if [ "$e2e" = 1 ]; then
        [ -n "$probe_tests" ] && echo "main probe_cli: /bin/probe_cli $probe_tests"
        [ -n "$km_tests" ] && echo "main kernel_matrix: /bin/kernel_matrix $km_tests"
        [ -n "$hbone" ] && echo "main hbone_e2e: /bin/hbone_e2e $hbone"
        [ -n "$interop" ] && echo "main hbone_interop: /bin/hbone_interop $interop"
    fi
    echo "nouring nouring: /bin/ringtun-lib-tests kernel_features"
    if [ "$e2e" = 1 ]; then
        for bt in $nouring; do
            echo "nouring nouring:${bt%%:*}: /bin/${bt%%:*} ${bt#*:}"
        done
    fi
}
export VM_REPEAT=${RINGTUN_VM_REPEAT:-1}
export VM_TEST_ENV=${RINGTUN_VM_TEST_ENV:-}
export VM_RINGTUN_PATH=$ringtun_path
export VM_E2E_BINS="${e2e_bins[*]}"

# 4. The initramfs pieces, and one boot per kernel, up to RINGTUN_VM_PARALLEL at a time.
# The piece every kernel shares is built once; each kernel's module piece is kept next to the
# unpacked kernel and rebuilt only when the kernel or mkinitramfs.sh changes.
common=$cache/common.cpio.gz
echo "== initramfs: the shared piece (tools, test binaries, /init)"
"$here/mkinitramfs.sh" common "$common" "$bins/ringtun-lib-tests" "$bins/ringtun" >/dev/null
builder=$(sha256sum "$here/mkinitramfs.sh" | cut -d' ' -f1)

# One kernel, start to end; its lines go to stdout prefixed with the suite (VMs interleave).
boot() { # suite release kdir
    local suite=$1 release=$2 kdir=$3
    local out=$cache/$1
    local initrd=$out/initrd.cpio.gz log=$out/console.log
    say() { echo "[$suite] $*"; }
    mkdir -p "$out"
    rm -f "$out/vm-seconds" "$out/boot-failure.log"
    say "$release ($(cat "$kdir/package"))"
    if [ "$(cat "$kdir/modules.builder" 2>/dev/null)" != "$builder" ] || [ ! -s "$kdir/modules.cpio.gz" ]; then
        "$here/mkinitramfs.sh" modules "$kdir" "$kdir/modules.cpio.gz" >/dev/null
        echo "$builder" >"$kdir/modules.builder"
    fi
    local small=0
    case " $small_plan " in *" $suite "*) small=1 ;; esac
    write_plan "$small" >"$out/plan"
    "$here/mkinitramfs.sh" plan "$out/plan" "$out/plan.cpio.gz" >/dev/null
    cat "$common" "$kdir/modules.cpio.gz" "$out/plan.cpio.gz" >"$initrd"
    # Each VM gets RINGTUN_VM_TIMEOUT, but never more than what is left of the whole run's
    # budget: a slow VM is cut off with the results it has, rather than the run by CI.
    local vm_timeout=$timeout_s
    local left=$((start_time + budget_s - $(date +%s) - 15))
    [ "$left" -lt "$vm_timeout" ] && vm_timeout=$left
    if [ "$vm_timeout" -lt 30 ]; then
        say "SKIPPED: the run's budget of ${budget_s}s is spent" | tee "$log"
        return
    fi
    say "initramfs $(du -h "$initrd" | cut -f1); booting (timeout ${vm_timeout}s, console → $log)"
    local t0 qrc attempt
    t0=$(date +%s)
    for attempt in 1 2; do
        qrc=0
        # TCG runs one host thread per vCPU; `time` records how much of the host the VM used.
        local TIMEFORMAT='%R %U %S'
        {
            time timeout --kill-after=10 "$vm_timeout" qemu-system-x86_64 -accel tcg -cpu max \
                -smp "$cpus" -m 1536 -nographic -no-reboot \
                -kernel "$kdir/vmlinuz" -initrd "$initrd" \
                -append "console=ttyS0 panic=-1 quiet" </dev/null >"$log" 2>&1 || qrc=$?
        } 2>"$out/qemu-time"
        # A kernel that dies before /init under TCG (seen once: an int3 Oops in sched_clock_cpu
        # 2.5 s into boot, with the host loaded) is qemu's to answer for, not ringtun's: boot
        # it once more, keep the first console and say so (the report shows it).
        if [ "$attempt" = 1 ] && [ "$qrc" != 124 ] && ! grep -qa 'RINGTUN-VM-KERNEL' "$log"; then
            cp "$log" "$out/boot-failure.log"
            say "the kernel died before /init ($(grep -a -m1 -oE 'Oops: .*|Kernel panic.*' "$log" || echo "no panic line")); booting again (first console: $out/boot-failure.log)"
            vm_timeout=$((vm_timeout - ($(date +%s) - t0)))
            [ "$vm_timeout" -ge 30 ] && continue
        fi
        break
    done
    local took=$(($(date +%s) - t0))
    echo "$took" >"$out/vm-seconds"
    say "qemu exited $qrc after $took s, using $(awk '{ printf "%.0f", $2 + $3 }' "$out/qemu-time") s of host CPU"
    if [ "$qrc" = 124 ]; then
        say "TIMEOUT: the VM ran longer than ${vm_timeout}s" | tee -a "$log"
    fi
}

[ "$parallel" -ge 1 ] 2>/dev/null || parallel=1
run_note=" (host-side build included; ${#kernels[@]} VMs, up to $parallel at a time, $cpus vCPUs each \
under TCG, on a host with $(nproc) cores)"
report_args=()
for k in "${kernels[@]}"; do
    read -r suite _ kdir <<<"$k"
    report_args+=("$suite=$cache/$suite/console.log:$kdir/config")
done
# Newest kernel first: the newest run the longest plan, so the others fill in behind them.
running=0
for ((i = ${#kernels[@]} - 1; i >= 0; i--)); do
    k=${kernels[$i]}
    read -r suite release kdir <<<"$k"
    if [ "$running" -ge "$parallel" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    boot "$suite" "$release" "$kdir" &
    running=$((running + 1))
done
wait

# 5. The result.
rrc=0
docs_args=()
if [ "$docs" = 1 ]; then
    docs_args=(--matrix "$here/MATRIX.md" --readme README.md)
fi
python3 "$here/report.py" --json "$cache/results.json" --markdown "$cache/results.md" \
    --require-ciphers "$require_ciphers" --small-plan "$small_plan" \
    --total-seconds "$(($(date +%s) - start_time))" \
    --note "$run_note" "${docs_args[@]}" "${report_args[@]}" || rrc=$?
echo "table: $cache/results.md$([ "$docs" = 1 ] && echo " and $here/MATRIX.md, README.md")"
exit "$rrc"
