#!/usr/bin/env bash
# Builds the test VM's initramfs for one unpacked kernel (see fetch-kernel.sh):
# static busybox and its applet links, kTLS and crypto modules (depmod'd), ringtun's lib test
# binary and `ringtun` with their shared libraries and loader, and /init (init.sh).
#
#   mkinitramfs.sh <kernel-dir> <out.cpio.gz> <lib-test-binary> <ringtun-binary>
#
# Environment (all optional):
#   VM_FILTERS           libtest filters for the lib test binary
#   VM_NOURING           1: also probe (and run VM_NOURING_FILTERS) with io_uring_disabled=2
#   VM_NOURING_FILTERS   libtest filters for the io_uring-disabled pass
#   VM_TEST_TIMEOUT      seconds per test inside the VM
set -euo pipefail

kdir=${1:?kernel dir}
out=${2:?output cpio.gz}
test_bin=${3:?lib test binary}
ringtun_bin=${4:?ringtun binary}
here=$(cd "$(dirname "$0")" && pwd)
release=$(cat "$kdir/release")
modsrc=$kdir/modroot/lib/modules/$release

stage=$(mktemp -d "${out%/*}/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib64}
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

# Modules: kTLS and the crypto it asks for, with dependencies resolved by the host's kmod
# against the unpacked tree; plus whole crypto trees so algorithms the kernel requests by alias
# (crypto-gcm(aes), ...) can be found by busybox modprobe.
wanted="tls gcm ghash_generic ghash_clmulni_intel aesni_intel ccm chacha20poly1305 chacha_x86_64 poly1305_x86_64 veth"
loadable=
copy_module() { # path under $modsrc
    local rel=${1#*/lib/modules/"$release"/}
    mkdir -p "$stage/lib/modules/$release/$(dirname "$rel")"
    cp -n "$1" "$stage/lib/modules/$release/$rel"
}
for m in $wanted; do
    deps=$(modprobe -d "$kdir/modroot" -S "$release" --show-depends "$m" 2>/dev/null || true)
    # "builtin <name>" needs nothing; "insmod <path>" lines are the module and its deps.
    paths=$(awk '$1 == "insmod" { print $2 }' <<<"$deps")
    if [ -n "$paths" ]; then
        for p in $paths; do copy_module "$p"; done
        loadable="$loadable $m"
    fi
done
for tree in kernel/crypto kernel/arch/x86/crypto kernel/lib/crypto; do
    [ -d "$modsrc/$tree" ] || continue
    find "$modsrc/$tree" -name '*.ko' | while read -r p; do copy_module "$p"; done
done
cp "$modsrc"/modules.order "$modsrc"/modules.builtin "$modsrc"/modules.builtin.modinfo \
    "$stage/lib/modules/$release/" 2>/dev/null || true
depmod -b "$stage" "$release"

# ringtun's binaries, without debug info (they are ~80 MB each with it).
strip --strip-debug -o "$stage/bin/ringtun-lib-tests" "$test_bin"
strip --strip-debug -o "$stage/bin/ringtun" "$ringtun_bin"
# Their shared libraries and the dynamic loader, at the paths ldd names.
for lib in $(ldd "$test_bin" "$ringtun_bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | sort -u); do
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
    echo "VM_MODULES='${loadable# }'"
    echo "VM_TEST_BIN=/bin/ringtun-lib-tests"
    echo "VM_FILTERS='${VM_FILTERS:-data_plane::ktls data_plane::tls kernel_features}'"
    echo "VM_NOURING='${VM_NOURING:-1}'"
    echo "VM_NOURING_FILTERS='${VM_NOURING_FILTERS:-kernel_features}'"
    echo "VM_TEST_TIMEOUT='${VM_TEST_TIMEOUT:-300}'"
} >"$stage/etc/ringtun-vm.conf"
install -m 755 "$here/init.sh" "$stage/init"

(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
