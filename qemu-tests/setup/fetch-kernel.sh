#!/usr/bin/env bash
# Downloads Debian 12's stock kernel package and extracts it into a cache
# folder (never into /boot). Prints nothing on a cache hit.
#
# Result: $CACHE/vmlinuz and $CACHE/modules (= lib/modules/<release>), where
# CACHE defaults to .cache/kernel in the repository. KERNEL_PACKAGE pins a
# package name; by default the newest linux-image-6.1.0-*-amd64 is taken.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CACHE:-$top/.cache/kernel}
if [ -e "$cache/vmlinuz" ] && [ -d "$cache/modules/kernel" ]; then
	exit 0
fi
pkg=${KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
	pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
	if [ -z "$pkg" ]; then
		apt-get update -qq
		pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
	fi
fi
[ -n "$pkg" ] || { echo "fetch-kernel: no linux-image-6.1.0-*-amd64 package in the apt index" >&2; exit 1; }
echo "fetch-kernel: $pkg into $cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
deb=$(ls "$tmp"/*.deb)
mkdir -p "$tmp/x"
dpkg-deb -x "$deb" "$tmp/x"
release=$(ls "$tmp/x/lib/modules")
rm -rf "$cache.new"
mkdir -p "$cache.new"
mv "$tmp/x/boot/vmlinuz-$release" "$cache.new/vmlinuz"
mv "$tmp/x/boot/config-$release" "$cache.new/config"
mv "$tmp/x/lib/modules/$release" "$cache.new/modules"
echo "$release" > "$cache.new/release"
echo "$pkg" > "$cache.new/package"
rm -rf "$cache"
mv "$cache.new" "$cache"
