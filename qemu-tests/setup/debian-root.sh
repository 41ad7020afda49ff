#!/usr/bin/env bash
# Builds (once) a minimal Debian root with systemd, udev and PostgreSQL for
# the real-OS tests, and downloads the two newest kernel packages of its
# release next to it, into the machine-wide cache so that every clone and
# worktree reuses it:
#
#   $UNLOCKRD_CACHE/roots/NAME/{root/,kernels/*.deb,key}
#
# NAME is debian12 (bookworm) or debian13 (trixie). The root comes from
# Debian's archive as the machine's apt sources name it (trixie from the same
# archive, as fetch-kernel.sh derives it); the machine's own apt sources and
# state are never touched. The cache is keyed on what goes into it (this
# script, the suite, the archive URI, the package list): a different key, or
# a missing or half-built root, is rebuilt. Prints nothing on a cache hit.
#
# Usage: debian-root.sh NAME...
set -euo pipefail
base=${UNLOCKRD_CACHE:-/var/cache/unlockrd}
roots=$base/roots
here=$(cd "$(dirname "$0")" && pwd)
# What the tests need in the OS: an init (systemd), udev for /dev/mapper
# links, the database on the encrypted volume, and what Debian's kernel
# packages depend on (kmod, linux-base) and what unlockrd depends on (xz).
include=systemd,systemd-sysv,udev,postgresql,kmod,linux-base,xz-utils,procps

suite_of() {
	case $1 in
	debian12) echo bookworm ;;
	debian13) echo trixie ;;
	*) echo "debian-root: unknown root $1 (debian12, debian13)" >&2; return 1 ;;
	esac
}

kernel_pattern() {
	case $1 in
	debian12) echo '^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
	debian13) echo '^linux-image-6\.12\.[0-9]+\+deb13-amd64$' ;;
	esac
}

# mirror: the archive URI of the machine's own bookworm entry.
mirror() {
	local f u
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		u=$(awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			if ($(i+1) == "bookworm") { print $i; exit } }' "$f")
		[ -n "$u" ] && { echo "$u"; return; }
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		u=$(awk 'BEGIN { RS = ""; FS = "\n" } {
			uri = ""; ok = 0
			for (i = 1; i <= NF; i++) {
				if ($i ~ /^URIs:/) { split(substr($i, 6), a, /[ \t]+/); for (j in a) if (a[j] != "") uri = a[j] }
				if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) ok = 1
			}
			if (ok && uri != "") { print uri; exit }
		}' "$f")
		[ -n "$u" ] && { echo "$u"; return; }
	done
	echo "debian-root: no bookworm entry in the machine's apt sources" >&2
	return 1
}

# apt options for the release's package index: the machine's own for
# bookworm, fetch-kernel.sh's private trixie lists for trixie.
apt_opts=()
apt_for() {
	apt_opts=()
	[ "$1" = debian13 ] || return 0
	"$here/fetch-kernel.sh" debian13 # makes the private trixie lists
	local d=$base/kernels/apt-trixie
	apt_opts=(
		-o "Dir::Etc::SourceList=$d/trixie.sources"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::State::Lists=$d/lists"
		-o "Dir::Cache=$d/cache"
		-o "APT::Get::List-Cleanup=0"
	)
}

build() {
	local name=$1 suite uri key dir=$roots/$1
	suite=$(suite_of "$name")
	uri=$(mirror)
	key=$( { sha256sum <"$0"; echo "$suite $uri $include"; } | sha256sum | cut -c1-16)
	if [ -s "$dir/key" ] && [ "$(cat "$dir/key")" = "$key" ] && [ -x "$dir/root/sbin/init" ] &&
		ls "$dir/kernels/"*.deb >/dev/null 2>&1; then
		return 0
	fi
	local start=$SECONDS
	echo "debian-root: building $name ($suite from $uri, key $key) into $dir"
	mkdir -p "$roots"
	tmp=$(mktemp -d "$roots/.build-$name.XXXXXX")
	debootstrap --variant=minbase --include="$include" "$suite" "$tmp/root" "$uri" >"$tmp/debootstrap.log" 2>&1 || {
		tail -n 30 "$tmp/debootstrap.log" >&2
		echo "debian-root: debootstrap $suite failed (log above)" >&2
		return 1
	}
	rm -f "$tmp/root/var/cache/apt/archives/"*.deb
	# The two newest kernel packages: the tests install the older, then
	# upgrade to the newer through unlockrd's hook.
	apt_for "$name"
	local pkgs
	pkgs=$(apt-cache "${apt_opts[@]}" search --names-only "$(kernel_pattern "$name")" | awk '{print $1}' | sort -V | tail -n 2)
	[ "$(echo "$pkgs" | wc -l)" -eq 2 ] || { echo "debian-root: fewer than two kernel packages for $name" >&2; return 1; }
	mkdir -p "$tmp/kernels"
	# shellcheck disable=SC2086
	(cd "$tmp/kernels" && apt-get "${apt_opts[@]}" download -q $pkgs 2>&1 | grep -v unsandboxed || true)
	[ "$(ls "$tmp/kernels/"*.deb | wc -l)" -eq 2 ] || { echo "debian-root: kernel download failed" >&2; return 1; }
	echo "$key" >"$tmp/key"
	# Atomic for readers: the folder appears complete or not at all.
	rm -rf "$dir"
	mv "$tmp" "$dir"
	tmp=
	echo "debian-root: $name built in $((SECONDS - start)) s"
}

tmp=
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
[ "$#" -gt 0 ] || set -- debian12 debian13
mkdir -p "$roots"
# One builder at a time per machine: a second clone waits, then hits the cache.
exec 9>"$roots/.lock"
flock 9
for n in "$@"; do
	build "$n"
done
