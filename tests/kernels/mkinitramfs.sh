#!/usr/bin/env bash
# Builds the test VM's initramfs in two pieces, concatenated at boot (the kernel unpacks
# concatenated, separately compressed cpio archives in turn):
#
#   mkinitramfs.sh modules <kernel-dir> <out.cpio.gz>
#       one kernel's piece: kTLS, crypto, veth and netfilter modules (depmod'd) and the list
#       /init loads (/etc/ringtun-vm.modules). Depends only on the kernel and this script, so
#       run.sh keeps it next to the unpacked kernel and rebuilds it only when either changes.
#   mkinitramfs.sh common <out.cpio.gz> <lib-test-binary> <ringtun-binary>
#       the piece every kernel shares: static busybox and its applet links; the host's
#       iproute2, iptables (nft and legacy, with their xtables extensions), nsenter and sysctl;
#       ringtun's test binaries and `ringtun` with their shared libraries and loader; /init
#       (init.sh) and its configuration. Built once per run.
#   mkinitramfs.sh plan <plan-file> <out.cpio.gz>
#       the test plan one VM runs, as /etc/ringtun-vm.suites (format: init.sh), so kernels can
#       run different plans with the same shared piece.
#
# Environment for `common` (all optional):
#   VM_E2E_BINS          integration test binaries, installed as /bin/<name> (cargo's -<hash>
#                        suffix removed), e.g. .../deps/hbone_e2e-<hash> as /bin/hbone_e2e
#   VM_RINGTUN_PATH      the absolute path the integration tests run ringtun from
#                        (CARGO_BIN_EXE_ringtun); a wrapper that keeps each `ringtun run` log
#                        goes there
#   VM_NOURING           1: also run the plan's nouring phase (kernel.io_uring_disabled=2)
#   VM_TEST_TIMEOUT      seconds per test inside the VM
#   VM_REPEAT            runs of each test (default 1)
#   VM_TEST_ENV          "NAME=value ..." exported to every test
set -euo pipefail

mode=${1:?modules or common}
here=$(cd "$(dirname "$0")" && pwd)
case $mode in
modules)
    kdir=${2:?kernel dir}
    out=${3:?output cpio.gz}
    ;;
common)
    out=${2:?output cpio.gz}
    test_bin=${3:?lib test binary}
    ringtun_bin=${4:?ringtun binary}
    ;;
plan)
    plan_file=${2:?plan file}
    out=${3:?output cpio.gz}
    ;;
*)
    echo "mkinitramfs: unknown piece $mode (modules, common or plan)" >&2
    exit 2
    ;;
esac

stage=$(mktemp -d "${out%/*}/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# One kernel's modules: kTLS and its crypto, veth, netfilter, and the list /init loads.
build_modules() {
    release=$(cat "$kdir/release")
    modsrc=$kdir/modroot/lib/modules/$release
    # Dependencies are resolved by the host's kmod against the unpacked tree; whole crypto
    # trees are copied too, so algorithms the kernel requests by alias (crypto-gcm(aes), ...)
    # can be found by busybox modprobe.
    # kTLS and its crypto; veth for the namespace testbed; what the capture rules use through
    # iptables-nft (nf_tables, the xt matches and targets nft_compat runs, conntrack, NAT for
    # REDIRECT, TPROXY and its socket lookups). Each is loaded at boot (init.sh) so a failure is
    # reported by name; the whole netfilter trees are copied too, for what the kernel asks for by
    # alias (nft-chain-2-nat, ...).
    wanted="tls gcm ghash_generic ghash_clmulni_intel aesni_intel ccm chacha20poly1305 chacha_x86_64 poly1305_x86_64 veth
        nf_tables nfnetlink nft_compat nft_chain_nat nft_ct nft_redir nft_tproxy nft_socket
        nf_conntrack nf_nat nf_defrag_ipv4 nf_defrag_ipv6 nf_tproxy_ipv4 nf_tproxy_ipv6
        nf_socket_ipv4 nf_socket_ipv6 x_tables xt_mark xt_connmark xt_conntrack xt_REDIRECT
        xt_TPROXY xt_socket xt_tcpudp xt_comment xt_nat xt_addrtype"
    # Legacy x_tables tables: copied (with dependencies) but not loaded at boot, so iptables-nft
    # sees a clean kernel; iptables-legacy would load them on demand.
    copied_only="ip_tables ip6_tables iptable_nat iptable_mangle iptable_filter iptable_raw
        ip6table_nat ip6table_mangle ip6table_filter ip6table_raw"
    loadable=
    absent=
    copy_module() { # path under $modsrc
        local rel=${1#*/lib/modules/"$release"/}
        mkdir -p "$stage/lib/modules/$release/$(dirname "$rel")"
        cp -n "$1" "$stage/lib/modules/$release/$rel"
    }
    for m in $wanted $copied_only; do
        deps=$(modprobe -d "$kdir/modroot" -S "$release" --show-depends "$m" 2>/dev/null || true)
        # "builtin <name>" needs nothing; "insmod <path>" lines are the module and its deps.
        paths=$(awk '$1 == "insmod" { print $2 }' <<<"$deps")
        if [ -n "$paths" ]; then
            for p in $paths; do copy_module "$p"; done
            case " $(echo $copied_only) " in *" $m "*) ;; *) loadable="$loadable $m" ;; esac
        elif ! grep -q "^builtin $m\b" <<<"$deps"; then
            # Neither a module nor listed as built in: built in without a modules.builtin entry
            # (7.x: nfnetlink), or merged into another one (7.x: the ghash, chacha and poly1305
            # accelerators moved into lib/crypto). init.sh reports it absent; what it provided is
            # checked by the tests that need it, not by name.
            absent="$absent $m"
        fi
    done
    for tree in kernel/crypto kernel/arch/x86/crypto kernel/lib/crypto kernel/net/netfilter \
        kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter; do
        [ -d "$modsrc/$tree" ] || continue
        find "$modsrc/$tree" -name '*.ko' | while read -r p; do copy_module "$p"; done
    done
    cp "$modsrc"/modules.order "$modsrc"/modules.builtin "$modsrc"/modules.builtin.modinfo \
        "$stage/lib/modules/$release/" 2>/dev/null || true
    depmod -b "$stage" "$release"
    mkdir -p "$stage/etc"
    {
        echo "VM_MODULES='$(echo $loadable)'"
        echo "VM_ABSENT_MODULES='$(echo $absent)'"
    } >"$stage/etc/ringtun-vm.modules"
}

# Everything every kernel shares: tools, ringtun's binaries, /init, its configuration, the plan.
build_common() {
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib64,var}
    ln -s /run "$stage/var/run"
    mknod -m 600 "$stage/dev/console" c 5 1
    mknod -m 666 "$stage/dev/null" c 1 3

    # busybox (static) and a link per applet.
    busybox=/bin/busybox
    if ldd "$busybox" >/dev/null 2>&1; then
        echo "mkinitramfs: $busybox is dynamically linked; install busybox-static" >&2
        exit 1
    fi
    cp "$busybox" "$stage/bin/busybox"
    for applet in $("$stage/bin/busybox" --list-full); do
        [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
    done

    # ringtun's binaries, without debug info (they are ~80 MB each with it).
    strip --strip-debug -o "$stage/bin/ringtun-lib-tests" "$test_bin"
    strip --strip-debug -o "$stage/bin/ringtun" "$ringtun_bin"
    elfs=("$test_bin" "$ringtun_bin")
    for b in ${VM_E2E_BINS:-}; do
        name=$(basename "$b")
        name=${name%-[0-9a-f]*[0-9a-f]} # cargo's -<hash> suffix
        strip --strip-debug -o "$stage/bin/$name" "$b"
        elfs+=("$b")
    done
    if [ -n "${VM_RINGTUN_PATH:-}" ]; then
        # The integration tests run ringtun from the path cargo built it at. A wrapper there keeps
        # a hard link to the log of every `ringtun run` (the tests delete their copy when they
        # pass) and then execs the real binary, so the process, its pid and its descriptors are
        # ringtun's own.
        mkdir -p "$stage$(dirname "$VM_RINGTUN_PATH")"
        cat >"$stage$VM_RINGTUN_PATH" <<'WRAPPER'
#!/bin/sh
if [ "$1" = run ] && [ -n "$RINGTUN_VM_KEEP" ]; then
    log=$(readlink "/proc/$$/fd/2")
    case $log in
    /tmp/*.log)
        mkdir -p "$RINGTUN_VM_KEEP"
        ln -f "$log" "$RINGTUN_VM_KEEP/$(basename "$(dirname "$log")")-$(basename "$log")" 2>/dev/null
        ;;
    esac
fi
exec /bin/ringtun "$@"
WRAPPER
        chmod 755 "$stage$VM_RINGTUN_PATH"
        # A copy outside the tree: init puts it back when a tmpfs is mounted over its directory
        # (a checkout under /tmp, whose /tmp the VM replaces with a fresh tmpfs).
        cp -p "$stage$VM_RINGTUN_PATH" "$stage/bin/ringtun-at-build-path"
    fi

    # The host's network tools for the testbed and the capture rules (busybox's `ip` has no
    # `netns`, and busybox has no iptables). They go to /usr/local/sbin, first in PATH.
    mkdir -p "$stage/usr/local/sbin"
    add_tool() { # name
        local src
        src=$(command -v "$1" 2>/dev/null) || {
            echo "mkinitramfs: no $1 on the host" >&2
            return 1
        }
        src=$(readlink -f "$src")
        if [ ! -e "$stage/usr/local/sbin/$(basename "$src")" ]; then
            cp "$src" "$stage/usr/local/sbin/$(basename "$src")"
            elfs+=("$src")
        fi
        [ "$(basename "$src")" = "$1" ] || ln -sf "$(basename "$src")" "$stage/usr/local/sbin/$1"
    }
    add_tool ip
    add_tool nsenter
    add_tool sysctl
    # xtables-nft-multi and xtables-legacy-multi pick their personality from argv[0].
    for t in iptables-nft ip6tables-nft iptables-nft-save ip6tables-nft-save iptables-nft-restore \
        ip6tables-nft-restore iptables-legacy ip6tables-legacy iptables-legacy-save \
        ip6tables-legacy-save iptables-legacy-restore ip6tables-legacy-restore; do
        add_tool "$t"
    done
    for t in iptables ip6tables iptables-save iptables-restore ip6tables-save ip6tables-restore; do
        ln -sf xtables-nft-multi "$stage/usr/local/sbin/$t"
    done
    # iptables loads its matches and targets (libxt_*.so) at run time: ldd does not see them.
    xtdir=
    for d in /usr/lib/x86_64-linux-gnu/xtables /usr/lib64/xtables /usr/lib/xtables; do
        [ -d "$d" ] && { xtdir=$d; break; }
    done
    [ -n "$xtdir" ] || { echo "mkinitramfs: no xtables extension directory on the host" >&2; exit 1; }
    mkdir -p "$stage$xtdir"
    cp -a "$xtdir"/. "$stage$xtdir/"
    for so in "$xtdir"/*.so; do elfs+=("$so"); done
    # iptables resolves "tcp" through /etc/protocols.
    for f in /etc/protocols /etc/services /etc/ethertypes; do
        if [ -e "$f" ]; then cp "$f" "$stage$f"; fi
    done

    # Every binary's shared libraries and the dynamic loader, at the paths ldd names.
    for lib in $(ldd "${elfs[@]}" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }' | sort -u); do
        [ -e "$stage$lib" ] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done

    cat >"$stage/etc/hosts" <<'EOF'
127.0.0.1 localhost ringtun-vm
::1 localhost ip6-localhost ip6-loopback
EOF
    echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
    echo 'root:x:0:' >"$stage/etc/group"
    {
        echo "VM_NOURING='${VM_NOURING:-1}'"
        echo "VM_TEST_TIMEOUT='${VM_TEST_TIMEOUT:-300}'"
        echo "VM_REPEAT='${VM_REPEAT:-1}'"
        echo "VM_TEST_ENV='${VM_TEST_ENV:-}'"
        echo "VM_RINGTUN_PATH='${VM_RINGTUN_PATH:-}'"
    } >"$stage/etc/ringtun-vm.conf"
    install -m 755 "$here/init.sh" "$stage/init"
}

case $mode in
modules) build_modules ;;
common) build_common ;;
plan)
    mkdir -p "$stage/etc"
    cp "$plan_file" "$stage/etc/ringtun-vm.suites"
    ;;
esac

(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
