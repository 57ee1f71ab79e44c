#!/usr/bin/env bash
# Fetches and unpacks the current Debian cloud kernel of one suite, through apt with a private
# sources list and state directory (the host's own apt configuration is never changed).
#
#   fetch-kernel.sh <suite> <cache-dir>
#
# On success prints one line, "<release> <kernel-dir>", where <kernel-dir> holds:
#   vmlinuz                  the kernel image
#   modroot/lib/modules/<release>/...   every module, decompressed (.ko), depmod'd
#   release                  the release string (uname -r)
#   package                  the .deb file name it came from
# Exit status 2 means "suite unreachable and nothing cached" (the caller may skip the suite).
set -euo pipefail

suite=${1:?suite (bookworm, trixie, ...)}
cache=${2:?cache dir}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
apt_dir=$cache/apt-$suite
debs=$cache/debs
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$debs"

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$apt_dir/sources.list" <<EOF
deb [signed-by=$keyring] http://deb.debian.org/debian $suite main
deb [signed-by=$keyring] http://deb.debian.org/debian $suite-updates main
deb [signed-by=$keyring] http://deb.debian.org/debian-security $suite-security main
EOF

apt_opts=(
    -oDir::Etc::SourceList="$apt_dir/sources.list"
    -oDir::Etc::SourceParts=/dev/null
    -oDir::State::Lists="$apt_dir/lists"
    -oDir::Cache="$apt_dir/cache"
    -oAPT::Architecture=amd64
    -oAcquire::Languages=none
    -oAPT::Sandbox::User=root
    -oDebug::NoLocking=1
    -oAcquire::Retries=3
)

log() { echo "fetch-kernel[$suite]: $*" >&2; }

# Refresh the private package lists at most every few hours (RINGTUN_VM_REFRESH=1 forces it).
stamp=$apt_dir/updated
max_age_min=${RINGTUN_VM_LIST_MAX_AGE_MIN:-360}
if [ "${RINGTUN_VM_REFRESH:-0}" = 1 ] || [ ! -e "$stamp" ] ||
    [ -n "$(find "$stamp" -mmin +"$max_age_min" 2>/dev/null)" ]; then
    log "apt-get update (private lists in $apt_dir)"
    # A mirror hiccup should not fail the matrix: three attempts, then the cached lists.
    for attempt in 1 2 3; do
        if apt-get "${apt_opts[@]}" -qq update >"$apt_dir/update.log" 2>&1 &&
            ! grep -qE '^(E:|Err:)' "$apt_dir/update.log"; then
            touch "$stamp"
            break
        fi
        if [ "$attempt" = 3 ]; then
            log "apt-get update failed 3 times (see $apt_dir/update.log); trying the cached lists"
        else
            log "apt-get update failed (attempt $attempt); retrying in $((attempt * 5)) s"
            sleep $((attempt * 5))
        fi
    done
fi

# The metapackage names the current ABI's image package.
pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-/ { print $2; exit }' || true)
deb=
if [ -n "$pkg" ]; then
    version=$(apt-cache "${apt_opts[@]}" policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2; exit }') || true
    # Debian file names escape ':' in versions as %3a; kernel versions have no epoch.
    deb=$debs/${pkg}_${version}_amd64.deb
    if [ ! -s "$deb" ]; then
        log "apt-get download $pkg=$version"
        for attempt in 1 2 3; do
            if (cd "$debs" && apt-get "${apt_opts[@]}" -qq download "$pkg=$version" >&2); then
                break
            fi
            if [ "$attempt" = 3 ]; then
                log "download of $pkg failed 3 times"
                deb=
            else
                log "download of $pkg failed (attempt $attempt); retrying in $((attempt * 5)) s"
                sleep $((attempt * 5))
            fi
        done
    fi
fi
if [ -z "$deb" ] || [ ! -s "$deb" ]; then
    # Unreachable now: fall back to the newest cached package of this suite, if any.
    deb=$(cat "$cache/$suite.last-deb" 2>/dev/null || true)
    if [ -z "$deb" ] || [ ! -s "$deb" ]; then
        log "no kernel package for $suite (unreachable and nothing cached)"
        exit 2
    fi
    log "using cached $deb"
fi
echo "$deb" >"$cache/$suite.last-deb"

kdir=$cache/$suite/$(basename "$deb" .deb)
if [ ! -e "$kdir/ready" ]; then
    log "unpacking $(basename "$deb")"
    rm -rf "$kdir"
    mkdir -p "$kdir/pkg"
    dpkg-deb -x "$deb" "$kdir/pkg"
    # bookworm: /lib/modules; trixie (merged /usr): /usr/lib/modules.
    moddir=$(find "$kdir/pkg/lib/modules" "$kdir/pkg/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1 || true)
    [ -n "$moddir" ] || { log "no modules directory in $deb"; exit 1; }
    release=$(basename "$moddir")
    cp "$kdir/pkg/boot/vmlinuz-$release" "$kdir/vmlinuz"
    mkdir -p "$kdir/modroot/lib/modules"
    mv "$moddir" "$kdir/modroot/lib/modules/$release"
    # Compressed modules (trixie: .ko.xz) are decompressed: busybox modprobe loads plain .ko.
    find "$kdir/modroot" -name '*.ko.xz' -exec xz -d {} +
    find "$kdir/modroot" -name '*.ko.zst' -exec zstd -q -d --rm {} +
    find "$kdir/modroot" -name '*.ko.gz' -exec gzip -d {} +
    depmod -b "$kdir/modroot" "$release"
    echo "$release" >"$kdir/release"
    basename "$deb" >"$kdir/package"
    cp "$kdir/pkg/boot/config-$release" "$kdir/config" 2>/dev/null || true
    rm -rf "$kdir/pkg"
    touch "$kdir/ready"
fi
echo "$(cat "$kdir/release") $kdir"
