#!/usr/bin/env bash
# Fetches and unpacks the current Debian cloud kernel of one suite, through apt with a private
# sources list and state directory (the host's own apt configuration is never changed). The
# Debian archive is reached at whatever address this machine's apt configuration already uses
# for it (its sources.list, sources.list.d/*.list and deb822 *.sources, as apt itself parses
# them), so the runner names no mirror and follows the machine's choice.
#
#   fetch-kernel.sh <suite> <cache-dir>
#   fetch-kernel.sh --sources <suite>    print the private sources list for <suite> and exit
#
# Suites: a release (bullseye, bookworm, trixie, ...: the release, its -updates and, where the
# machine names a security archive, its -security), a backports suite (trixie-backports: that
# suite alone, so its kernel is the candidate) or sid/unstable (alone).
#
# On success prints one line, "<release> <kernel-dir>", where <kernel-dir> holds:
#   vmlinuz                  the kernel image
#   modroot/lib/modules/<release>/...   every module, decompressed (.ko), depmod'd
#   release                  the release string (uname -r)
#   package                  the image package's .deb file name
#   config                   the kernel's build configuration (when the packages carry it)
# Exit status 2 means "no kernel package: the suite is unreachable or not configured, and
# nothing is cached" (the caller may skip the suite).
set -euo pipefail

log() { echo "fetch-kernel[${suite:-?}]: $*" >&2; }

# Debian's release names and aliases. A machine's sources that name one of these (bare or as
# -updates, -backports, -security, ...) point at the Debian archive or a mirror of it; the
# signature check below (debian-archive-keyring) refuses anything else.
debian_releases="jessie stretch buster bullseye bookworm trixie forky duke sid
    oldoldstable oldstable stable testing unstable experimental"

# "<kind> <uri>" for each Debian archive URI the machine's apt configuration names, in its
# order; kind is "archive" (releases, -updates, -backports) or "security" (-security).
debian_uris() {
    apt-get indextargets --no-release-info --format '$(TARGET_OF) $(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v releases="$debian_releases" '
            BEGIN { n = split(releases, r, /[ \t\n]+/); for (i = 1; i <= n; i++) known[r[i]] = 1 }
            $1 != "deb" || $2 ~ /^cdrom:/ { next }
            {
                uri = $2; sub(/\/+$/, "", uri)
                base = $3; kind = "archive"
                if (base ~ /-security$/ || base ~ /\/updates$/) {
                    kind = "security"; sub(/(-security|\/updates)$/, "", base)
                } else {
                    sub(/-(updates|backports|backports-sloppy|proposed-updates)$/, "", base)
                }
                if (!(base in known) || seen[kind " " uri]++) next
                print kind, uri
            }'
}

# The private sources list for one suite, on stdout.
private_sources() {
    local suite=$1 uris archive security keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    uris=$(debian_uris)
    archive=$(awk '$1 == "archive" { print $2; exit }' <<<"$uris")
    security=$(awk '$1 == "security" { print $2; exit }' <<<"$uris")
    if [ -z "$archive" ]; then
        log "this machine's apt configuration names no Debian archive (no deb line for a Debian" \
            "release in /etc/apt/sources.list, sources.list.d/*.list or *.sources); add the Debian" \
            "archive or a mirror of it there (e.g. a 'deb <mirror>/debian bookworm main' line)"
        return 1
    fi
    echo "deb [signed-by=$keyring] $archive $suite main"
    case $suite in
    *-backports | *-backports-sloppy | sid | unstable | experimental) ;;
    *)
        echo "deb [signed-by=$keyring] $archive $suite-updates main"
        if [ -n "$security" ]; then
            echo "deb [signed-by=$keyring] $security $suite-security main"
        else
            log "no Debian security archive in this machine's apt configuration: $suite without" \
                "$suite-security (its kernel may be older than the current one)"
        fi
        ;;
    esac
}

if [ "${1:-}" = --sources ]; then
    suite=${2:?suite}
    private_sources "$suite"
    exit
fi

suite=${1:?suite (bullseye, bookworm, trixie, trixie-backports, ...)}
cache=${2:?cache dir}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
apt_dir=$cache/apt-$suite
debs=$cache/debs
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$debs"

apt_opts=(
    -oDir::Etc::SourceList="$apt_dir/sources.list"
    -oDir::Etc::SourceParts=/dev/null
    -oDir::State::Lists="$apt_dir/lists"
    -oDir::Cache="$apt_dir/cache"
    -oAPT::Architecture=amd64
    -oAcquire::Languages=none
    -oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
    -oAPT::Sandbox::User=root
    -oDebug::NoLocking=1
    -oAcquire::Retries=3
)

# Refresh the private package lists at most every few hours (RINGTUN_VM_REFRESH=1 forces it),
# and whenever the machine's archive address changed.
configured=1
if ! private_sources "$suite" >"$apt_dir/sources.list.new"; then
    configured=0
    rm -f "$apt_dir/sources.list.new"
elif ! cmp -s "$apt_dir/sources.list.new" "$apt_dir/sources.list"; then
    mv "$apt_dir/sources.list.new" "$apt_dir/sources.list"
    rm -f "$apt_dir/updated"
else
    rm -f "$apt_dir/sources.list.new"
fi
stamp=$apt_dir/updated
max_age_min=${RINGTUN_VM_LIST_MAX_AGE_MIN:-360}
if [ "$configured" = 1 ] && { [ "${RINGTUN_VM_REFRESH:-0}" = 1 ] || [ ! -e "$stamp" ] ||
    [ -n "$(find "$stamp" -mmin +"$max_age_min" 2>/dev/null)" ]; }; then
    log "apt-get update from $(awk '{ print $3 " " $4 }' "$apt_dir/sources.list" | paste -sd, -)" \
        "(private lists in $apt_dir)"
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

# The packages of the current cloud kernel, one per line: the metapackage names the current
# ABI's image package; from 7.x on that image is itself split into linux-binary-<abi>
# (vmlinuz), linux-modules-<abi> and linux-base-<abi> (config, modules.builtin, ...).
kernel_packages() {
    local image abi
    [ -e "$apt_dir/sources.list" ] || return 0
    image=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }' || true)
    [ -n "$image" ] || return 0
    abi=${image#linux-image-}
    echo "$image"
    apt-cache "${apt_opts[@]}" depends "$image" 2>/dev/null | awk -v abi="-$abi" '
        $1 == "Depends:" && $2 ~ /^linux-[a-z]+-/ {
            n = length($2) - length(abi) + 1
            if (n > 0 && substr($2, n) == abi) print $2
        }' | sort -u
}

# Each package's candidate .deb in $debs, downloaded unless already there; the image's first.
fetched=()
for pkg in $(kernel_packages); do
    version=$(apt-cache "${apt_opts[@]}" policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2; exit }') || true
    [ -n "$version" ] && [ "$version" != "(none)" ] || { fetched=(); break; }
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
            else
                log "download of $pkg failed (attempt $attempt); retrying in $((attempt * 5)) s"
                sleep $((attempt * 5))
            fi
        done
    fi
    [ -s "$deb" ] || { fetched=(); break; }
    fetched+=("$deb")
done
last=$cache/$suite.last-debs
if [ ${#fetched[@]} -eq 0 ]; then
    # Unreachable or not configured now: fall back to the last complete set of this suite.
    mapfile -t fetched <"$last" 2>/dev/null || fetched=()
    for deb in "${fetched[@]}"; do
        [ -s "$deb" ] || fetched=()
    done
    if [ ${#fetched[@]} -eq 0 ]; then
        log "no kernel package for $suite (unreachable or not configured, and nothing cached)"
        exit 2
    fi
    log "using cached $(basename "${fetched[0]}")"
fi
printf '%s\n' "${fetched[@]}" >"$last"

kdir=$cache/$suite/$(basename "${fetched[0]}" .deb)
if [ ! -e "$kdir/ready" ]; then
    log "unpacking $(for d in "${fetched[@]}"; do basename "$d"; done | paste -sd' ' -)"
    rm -rf "$kdir"
    mkdir -p "$kdir/pkg"
    for deb in "${fetched[@]}"; do
        dpkg-deb -x "$deb" "$kdir/pkg"
    done
    # bullseye, bookworm: /lib/modules; trixie on (merged /usr): /usr/lib/modules.
    moddir=$(find "$kdir/pkg/lib/modules" "$kdir/pkg/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1 || true)
    [ -n "$moddir" ] || { log "no modules directory in ${fetched[*]}"; exit 1; }
    release=$(basename "$moddir")
    # The image and config: /boot (up to 6.x) or the modules directory (7.x's split packages).
    for f in "$kdir/pkg/boot/vmlinuz-$release" "$moddir/vmlinuz"; do
        [ -e "$f" ] && { cp "$f" "$kdir/vmlinuz"; break; }
    done
    [ -e "$kdir/vmlinuz" ] || { log "no vmlinuz for $release in ${fetched[*]}"; exit 1; }
    for f in "$kdir/pkg/boot/config-$release" "$moddir/config"; do
        [ -e "$f" ] && { cp "$f" "$kdir/config"; break; }
    done
    rm -f "$moddir/vmlinuz"
    mkdir -p "$kdir/modroot/lib/modules"
    mv "$moddir" "$kdir/modroot/lib/modules/$release"
    # Compressed modules (trixie on: .ko.xz) are decompressed: busybox modprobe loads plain .ko.
    find "$kdir/modroot" -name '*.ko.xz' -exec xz -d {} +
    find "$kdir/modroot" -name '*.ko.zst' -exec zstd -q -d --rm {} +
    find "$kdir/modroot" -name '*.ko.gz' -exec gzip -d {} +
    depmod -b "$kdir/modroot" "$release"
    echo "$release" >"$kdir/release"
    basename "${fetched[0]}" >"$kdir/package"
    rm -rf "$kdir/pkg"
    touch "$kdir/ready"
fi
echo "$(cat "$kdir/release") $kdir"
