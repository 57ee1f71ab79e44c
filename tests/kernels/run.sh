#!/usr/bin/env bash
# Kernel matrix runner: boots Debian's cloud kernels under qemu (TCG) with a busybox initramfs,
# runs ringtun's kernel-facing lib tests inside with kTLS loaded, and reports the results on the
# host. See tests/kernels/README.md.
#
#   sudo tests/kernels/run.sh            # every suite in RINGTUN_VM_SUITES
#
# Environment:
#   RINGTUN_VM_SUITES    Debian suites to boot (default "bookworm trixie"; the first is required,
#                        the others are skipped with a warning when unreachable and not cached)
#   RINGTUN_VM_FILTERS   libtest filters (default "data_plane::ktls data_plane::tls kernel_features")
#   RINGTUN_VM_TIMEOUT   seconds one VM may run (default 600)
#   RINGTUN_VM_REFRESH   1: refresh the private apt lists now (otherwise at most every 6 h)
#   RINGTUN_VM_CACHE     cache and output directory (default target/kernels)
# Exit status: 0 only if every VM booted, printed its DONE marker and every test and check passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/kernels
start_time=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "run.sh: must run as root (apt, mknod for the initramfs)" >&2
    exit 1
fi

suites=${RINGTUN_VM_SUITES:-bookworm trixie}
timeout_s=${RINGTUN_VM_TIMEOUT:-600}
cache=${RINGTUN_VM_CACHE:-target/kernels}
export VM_FILTERS=${RINGTUN_VM_FILTERS:-data_plane::ktls data_plane::tls kernel_features}
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
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
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

# 3. ringtun's binaries, built on the host.
echo "== building ringtun test binaries"
artifacts=$(mktemp)
trap 'rm -f "$artifacts"' EXIT
cargo test --workspace --no-run --message-format=json >"$artifacts"
test_bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    t = j.get("target") or {}
    if j.get("reason") == "compiler-artifact" and t.get("name") == "ringtun" \
            and "lib" in t.get("kind", []) and j.get("profile", {}).get("test") and j.get("executable"):
        print(j["executable"])
' "$artifacts" | tail -n1)
cargo build --bin ringtun --message-format=json >"$artifacts"
ringtun_bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    t = j.get("target") or {}
    if j.get("reason") == "compiler-artifact" and t.get("name") == "ringtun" \
            and "bin" in t.get("kind", []) and j.get("executable"):
        print(j["executable"])
' "$artifacts" | tail -n1)
if [ -z "$test_bin" ] || [ -z "$ringtun_bin" ]; then
    echo "run.sh: could not find the ringtun lib test binary ($test_bin) or ringtun ($ringtun_bin)" >&2
    exit 1
fi
echo "   lib tests: $test_bin"
echo "   ringtun:   $ringtun_bin"

# 4. One initramfs and one boot per kernel.
report_args=()
for k in "${kernels[@]}"; do
    read -r suite release kdir <<<"$k"
    out=$cache/$suite
    initrd=$out/initrd.cpio.gz
    log=$out/console.log
    echo "== $suite: $release ($(cat "$kdir/package"))"
    "$here/mkinitramfs.sh" "$kdir" "$initrd" "$test_bin" "$ringtun_bin" >/dev/null
    echo "   initramfs $(du -h "$initrd" | cut -f1); booting (timeout ${timeout_s}s, console → $log)"
    t0=$(date +%s)
    qrc=0
    timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -m 1024 \
        -nographic -no-reboot \
        -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet" </dev/null >"$log" 2>&1 || qrc=$?
    echo "   qemu exited $qrc after $(($(date +%s) - t0)) s"
    [ "$qrc" = 124 ] && echo "   TIMEOUT: the VM ran longer than ${timeout_s}s" | tee -a "$log"
    report_args+=("$suite=$log:$kdir/config")
done

# 5. The result.
rrc=0
python3 "$here/report.py" --json "$cache/results.json" --markdown "$cache/results.md" \
    "${report_args[@]}" || rrc=$?
echo "kernel matrix took $(($(date +%s) - start_time)) s; table: $cache/results.md"
exit "$rrc"
