#!/bin/sh
# /init of the test VM (busybox sh). Loads kTLS, reports what ringtun's probe sees, runs the
# selected lib tests one by one and prints machine-readable markers on the serial console:
#
#   RINGTUN-VM-KERNEL <release>
#   RINGTUN-VM-MODULE <name> <ok|FAILED>
#   RINGTUN-VM-PROBE <one-line JSON of `ringtun probe --json`>
#   RINGTUN-VM-BEGIN <test>          (the test's own output follows)
#   RINGTUN-VM-RESULT <test> <ok|FAILED> <exit status> <seconds>
#   RINGTUN-VM-TLSSTAT <test> <counter>=+<n> ...   (/proc/net/tls_stat changes during the test)
#   RINGTUN-VM-NOURING-PROBE <JSON>  (after sysctl kernel.io_uring_disabled=2, where it exists)
#   RINGTUN-VM-NOURING-UNSUPPORTED <why>
#   RINGTUN-VM-DONE <number of failures>
#
# Configuration comes from /etc/ringtun-vm.conf (written by mkinitramfs.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
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
echo "RINGTUN-VM-ULPS $(cat /proc/sys/net/ipv4/tcp_available_ulp 2>/dev/null)"

one_line_probe() {
    ringtun probe --json 2>/tmp/probe.err | tr -d '\n'
    echo
}
echo "RINGTUN-VM-PROBE $(one_line_probe)"

tls_stat() {
    cat /proc/net/tls_stat 2>/dev/null || true
}

run_tests() {
    # $1: label prefix for results ("" or "nouring:")
    prefix=$1
    # Exact names of the selected tests, each run in its own process: a crash or hang names
    # its test and cannot take the others down.
    "$VM_TEST_BIN" --list --format=terse $VM_FILTERS 2>/dev/null | sed -n 's/: test$//p' >/tmp/tests
    if [ ! -s /tmp/tests ]; then
        echo "RINGTUN-VM-RESULT ${prefix}no-tests-matched FAILED 1 0"
        failures=$((failures + 1))
        return
    fi
    while read -r t; do
        echo "RINGTUN-VM-BEGIN ${prefix}$t"
        start=$(cut -d. -f1 /proc/uptime)
        tls_stat >/tmp/tls.before
        timeout "$VM_TEST_TIMEOUT" "$VM_TEST_BIN" --exact "$t" --test-threads=1 --nocapture </dev/null
        rc=$?
        tls_stat >/tmp/tls.after
        # The kernel's own kTLS counters, as evidence independent of the test's assertions.
        delta=$(awk 'NR == FNR { b[$1] = $2; next } $2 != b[$1] { printf " %s=+%d", $1, $2 - b[$1] }' /tmp/tls.before /tmp/tls.after)
        [ -n "$delta" ] && echo "RINGTUN-VM-TLSSTAT ${prefix}$t$delta"
        secs=$(($(cut -d. -f1 /proc/uptime) - start))
        if [ "$rc" = 0 ]; then
            echo "RINGTUN-VM-RESULT ${prefix}$t ok 0 $secs"
        else
            echo "RINGTUN-VM-RESULT ${prefix}$t FAILED $rc $secs"
            failures=$((failures + 1))
        fi
    done </tmp/tests
}
run_tests ""

# io_uring switched off by the administrator: ringtun must fall back to epoll and say why.
if [ "$VM_NOURING" = 1 ]; then
    if [ -e /proc/sys/kernel/io_uring_disabled ]; then
        if sysctl -w kernel.io_uring_disabled=2 >/dev/null; then
            echo "RINGTUN-VM-NOURING-PROBE $(one_line_probe)"
            if [ -n "$VM_NOURING_FILTERS" ]; then
                VM_FILTERS=$VM_NOURING_FILTERS
                run_tests "nouring:"
            fi
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
