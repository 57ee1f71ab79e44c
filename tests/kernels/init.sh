#!/bin/sh
# /init of the test VM (busybox sh). Loads kTLS, veth and netfilter, reports what ringtun's
# probe sees, runs the test plan test by test and prints machine-readable markers on the
# serial console:
#
#   RINGTUN-VM-KERNEL <release>
#   RINGTUN-VM-MODULE <name> <ok|FAILED ...|absent ...>
#   RINGTUN-VM-PROBE <one-line JSON of `ringtun probe --json`>
#   RINGTUN-VM-PLAN <plan line>      (each line of the phase about to run, see below)
#   RINGTUN-VM-BEGIN <test>          (the test's own output follows)
#   RINGTUN-VM-FACT <key> <value>    (printed by tests/kernel_matrix.rs inside a test)
#   RINGTUN-VM-RESULT <test> <ok|FAILED> <exit status> <seconds>
#   RINGTUN-VM-TLSSTAT <test> <counter>=+<n> ...   (/proc/net/tls_stat changes during the test,
#                                    in the VM's first namespace)
#   RINGTUN-VM-RINGTUN-LOG <test> <log> <line>     (from every `ringtun run` the test started:
#                                    its driver and tunnel TLS lines, errors and warnings)
#   RINGTUN-VM-NOURING-PROBE <JSON>  (after sysctl kernel.io_uring_disabled=2, where it exists)
#   RINGTUN-VM-NOURING-UNSUPPORTED <why>
#   RINGTUN-VM-DONE <number of failures>
#
# Configuration: /etc/ringtun-vm.conf, /etc/ringtun-vm.modules (the kernel's piece of the
# initramfs) and the test plan /etc/ringtun-vm.suites (all written by mkinitramfs.sh). Each
# plan line is
#
#   <phase> <prefix> <test binary> <libtest filters...>
#
# phase "main" runs first; phase "nouring" runs after `sysctl kernel.io_uring_disabled=2`
# (skipped where the sysctl does not exist). Each test's result name is <prefix><test name>
# (prefix "-" means none). Integration tests run with CI=1, so a root test cannot skip.
export PATH=/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
mkdir -p /run && mount -t tmpfs run /run
# Kernel messages would split marker lines on the shared console.
dmesg -n 1 2>/dev/null
ip link set lo up
hostname ringtun-vm

. /etc/ringtun-vm.conf
. /etc/ringtun-vm.modules
# The integration tests run ringtun from the path cargo built it at; under /tmp (a checkout
# there) the tmpfs just mounted hid it: put the wrapper back.
if [ -n "${VM_RINGTUN_PATH:-}" ] && [ ! -e "$VM_RINGTUN_PATH" ]; then
    mkdir -p "$(dirname "$VM_RINGTUN_PATH")"
    cp -p /bin/ringtun-at-build-path "$VM_RINGTUN_PATH"
fi
# shellcheck disable=SC2086 # NAME=value words
[ -n "$VM_TEST_ENV" ] && export $VM_TEST_ENV

failures=0
echo
echo "RINGTUN-VM-KERNEL $(uname -r)"

# kTLS and the crypto it uses (what the kernel would otherwise request on first use).
for m in $VM_MODULES; do
    if modprobe "$m" 2>/tmp/modprobe.err; then
        echo "RINGTUN-VM-MODULE $m ok"
    else
        echo "RINGTUN-VM-MODULE $m FAILED $(tr '\n' ' ' </tmp/modprobe.err)"
    fi
done
for m in $VM_ABSENT_MODULES; do
    echo "RINGTUN-VM-MODULE $m absent (no such module in this kernel: built in or merged)"
done
echo "RINGTUN-VM-ULPS $(cat /proc/sys/net/ipv4/tcp_available_ulp 2>/dev/null)"

one_line_probe() {
    ringtun probe --json 2>/tmp/probe.err | tr -d '\n'
    echo
}
echo "RINGTUN-VM-PROBE $(one_line_probe)"

tls_stat() {
    cat /proc/net/tls_stat 2>/dev/null || true
}

# The lines of a ringtun log worth seeing on the console: which driver and which TLS it chose,
# and anything that went wrong.
interesting='using the (epoll|io_uring) driver|io_uring driver: |tunnels use|ERROR|WARN|panicked'

n=0
run_tests() {
    # $1: result prefix ("-" for none), $2: test binary, $3...: libtest filters
    prefix=$1
    [ "$prefix" = - ] && prefix=
    bin=$2
    shift 2
    # Exact names of the selected tests, each run in its own process: a crash or hang names
    # its test and cannot take the others down.
    "$bin" --list --format=terse "$@" 2>/dev/null | sed -n 's/: test$//p' >/tmp/tests
    # Every filter must select something: a renamed or missing test fails instead of
    # silently shrinking the matrix.
    for f in "$@"; do
        if ! grep -qF -- "$f" /tmp/tests; then
            echo "RINGTUN-VM-RESULT ${prefix}$f FAILED no-test-matched 0"
            echo "   (no test in $bin matches the filter $f)"
            failures=$((failures + 1))
        fi
    done
    # Each test VM_REPEAT times in a row (flake hunting).
    : >/tmp/tests.run
    while read -r t; do
        i=0
        while [ "$i" -lt "${VM_REPEAT:-1}" ]; do
            echo "$t" >>/tmp/tests.run
            i=$((i + 1))
        done
    done </tmp/tests
    while read -r t; do
        n=$((n + 1))
        keep=/tmp/keep/$n
        mkdir -p "$keep"
        echo "RINGTUN-VM-BEGIN ${prefix}$t"
        start=$(cut -d. -f1 /proc/uptime)
        tls_stat >/tmp/tls.before
        CI=1 RINGTUN_VM_KEEP=$keep timeout "$VM_TEST_TIMEOUT" "$bin" --exact "$t" --test-threads=1 --nocapture </dev/null
        rc=$?
        tls_stat >/tmp/tls.after
        # The kernel's own kTLS counters, as evidence independent of the test's assertions.
        delta=$(awk 'NR == FNR { b[$1] = $2; next } $2 != b[$1] { printf " %s=+%d", $1, $2 - b[$1] }' /tmp/tls.before /tmp/tls.after)
        [ -n "$delta" ] && echo "RINGTUN-VM-TLSSTAT ${prefix}$t$delta"
        for log in "$keep"/*.log; do
            [ -e "$log" ] || continue
            grep -E "$interesting" "$log" | sort -u | head -n 40 | while read -r line; do
                echo "RINGTUN-VM-RINGTUN-LOG ${prefix}$t ${log##*/} $line"
            done
        done
        secs=$(($(cut -d. -f1 /proc/uptime) - start))
        if [ "$rc" = 0 ]; then
            echo "RINGTUN-VM-RESULT ${prefix}$t ok 0 $secs"
        else
            # The whole ringtun logs of a failed test, for the console log.
            for log in "$keep"/*.log; do
                [ -e "$log" ] || continue
                echo "---- ringtun log ${log##*/} (last 200 lines) ----"
                tail -n 200 "$log"
                echo "---- end of ${log##*/} ----"
            done
            echo "RINGTUN-VM-RESULT ${prefix}$t FAILED $rc $secs"
            failures=$((failures + 1))
        fi
        rm -rf "$keep"
        # Whatever a failed test left behind (namespaces, processes) must not disturb the next.
        for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }'); do
            ip netns del "$ns" 2>/dev/null
        done
    done </tmp/tests.run
}

run_phase() {
    grep "^$1 " /etc/ringtun-vm.suites >/tmp/phase.$1
    while read -r line; do echo "RINGTUN-VM-PLAN $line"; done </tmp/phase.$1
    while read -r _phase prefix bin filters; do
        # shellcheck disable=SC2086 # filters are words
        run_tests "$prefix" "$bin" $filters
    done </tmp/phase.$1
}

run_phase main

# io_uring switched off by the administrator: ringtun must fall back to epoll and say why.
if [ "$VM_NOURING" = 1 ]; then
    if [ -e /proc/sys/kernel/io_uring_disabled ]; then
        if sysctl -w kernel.io_uring_disabled=2 >/dev/null; then
            echo "RINGTUN-VM-NOURING-PROBE $(one_line_probe)"
            run_phase nouring
            sysctl -w kernel.io_uring_disabled=0 >/dev/null
        else
            echo "RINGTUN-VM-NOURING-UNSUPPORTED sysctl kernel.io_uring_disabled=2 refused"
        fi
    else
        echo "RINGTUN-VM-NOURING-UNSUPPORTED kernel has no kernel.io_uring_disabled sysctl (added in 6.6)"
    fi
fi

echo "RINGTUN-VM-DONE $failures"
sync
poweroff -f
# poweroff -f should not return; if it does, panic=-1 with -no-reboot ends qemu.
sleep 5
echo o >/proc/sysrq-trigger
