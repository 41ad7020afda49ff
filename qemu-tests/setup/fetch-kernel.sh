#!/usr/bin/env bash
# Downloads the stock Debian kernels the tests boot and extracts each into a
# machine-wide cache folder (never into /boot), so that every clone and
# worktree on the machine reuses them. Prints nothing on a cache hit.
#
# Result, per kernel NAME (debian12, debian13):
#   $UNLOCKRD_CACHE/kernels/NAME/{vmlinuz,modules/,config,release,package}
# where UNLOCKRD_CACHE defaults to /var/cache/unlockrd and modules/ is the
# package's lib/modules/<release> (Debian 13: usr/lib/modules/<release>).
#
# Usage: fetch-kernel.sh [NAME...]   (default: all kernels)
# KERNEL_PACKAGE_debian12 / KERNEL_PACKAGE_debian13 pin a package name.
#
# Debian 12's kernel comes from the machine's own apt sources. Debian 13's
# comes from the same archives with the suite renamed bookworm→trixie: the
# sources list is derived at run time from the machine's own (no archive
# host is written into the repository), and apt runs on private lists and
# caches under the cache folder, so the machine's own apt state is not
# touched.
set -euo pipefail
base=${UNLOCKRD_CACHE:-/var/cache/unlockrd}
kernels_dir=$base/kernels

have() { [ -e "$1/vmlinuz" ] && [ -d "$1/modules/kernel" ] && [ -s "$1/release" ]; }

# trixie_sources writes a deb822 sources file for trixie from the machine's
# own bookworm entries (one-line .list and deb822 .sources forms).
trixie_sources() {
	local out=$1 f
	: >"$out"
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		# deb [options] URI SUITE COMPONENT...
		awk '$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			uri = $i; suite = $(i+1)
			if (suite !~ /^bookworm/) next
			sub(/^bookworm/, "trixie", suite)
			printf "Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n", uri, suite
		}' "$f" >>"$out"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		# One stanza per blank-line separated paragraph; keep those with a
		# bookworm suite, rename it, drop the others.
		awk 'BEGIN { RS = ""; FS = "\n" }
		{
			keep = 0; types = ""; out = ""
			for (i = 1; i <= NF; i++) {
				line = $i
				if (line ~ /^#/) continue
				if (line ~ /^Suites:/) {
					n = split(substr(line, 8), s, /[ \t]+/); line = "Suites:"
					for (j = 1; j <= n; j++) {
						if (s[j] ~ /^bookworm/) { sub(/^bookworm/, "trixie", s[j]); line = line " " s[j]; keep = 1 }
					}
				}
				if (line ~ /^Types:/ && line !~ /(^|[ \t])deb([ \t]|$)/) keep = -1
				if (line ~ /^Types:/) line = "Types: deb"
				if (line ~ /^Components:/) line = "Components: main"
				out = out line "\n"
			}
			if (keep == 1) printf "%s\n", out
		}' "$f" >>"$out"
	done
	grep -q '^URIs:' "$out" || {
		echo "fetch-kernel: no bookworm entry in the machine's apt sources to derive trixie's from" >&2
		return 1
	}
}

# apt_for NAME prints apt options for the kernel's suite: none for the
# machine's own (debian12), private state for trixie (debian13).
apt_opts=()
apt_for() {
	apt_opts=()
	[ "$1" = debian13 ] || return 0
	local d=$kernels_dir/apt-trixie
	mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
	trixie_sources "$d/trixie.sources"
	apt_opts=(
		-o "Dir::Etc::SourceList=$d/trixie.sources"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::State::Lists=$d/lists"
		-o "Dir::Cache=$d/cache"
		-o "APT::Get::List-Cleanup=0"
	)
	if ! ls "$d/lists"/*_Packages* >/dev/null 2>&1; then
		apt-get "${apt_opts[@]}" update -qq
	fi
}

# pattern NAME: the package name pattern of that kernel.
pattern() {
	case $1 in
	debian12) echo '^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
	debian13) echo '^linux-image-6\.12\.[0-9]+\+deb13-amd64$' ;;
	*) echo "fetch-kernel: unknown kernel $1 (debian12, debian13)" >&2; return 1 ;;
	esac
}

newest() { apt-cache "${apt_opts[@]}" search --names-only "$(pattern "$1")" | awk '{print $1}' | grep -v -- '-unsigned$' | sort -V | tail -n 1; }

fetch() {
	local name=$1 cache=$kernels_dir/$1
	have "$cache" && return 0
	pattern "$name" >/dev/null
	apt_for "$name"
	local var=KERNEL_PACKAGE_$name pkg
	pkg=${!var:-}
	if [ -z "$pkg" ]; then
		pkg=$(newest "$name")
		if [ -z "$pkg" ]; then
			apt-get "${apt_opts[@]}" update -qq
			pkg=$(newest "$name")
		fi
	fi
	[ -n "$pkg" ] || { echo "fetch-kernel: no $(pattern "$name") package in the apt index" >&2; return 1; }
	echo "fetch-kernel: $pkg into $cache"
	mkdir -p "$kernels_dir"
	tmp=$(mktemp -d "$kernels_dir/.fetch-$name.XXXXXX")
	(cd "$tmp" && apt-get "${apt_opts[@]}" download -q "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
	local deb
	deb=$(ls "$tmp"/*.deb)
	mkdir -p "$tmp/x"
	dpkg-deb -x "$deb" "$tmp/x"
	local mods=$tmp/x/lib/modules
	[ -d "$mods" ] || mods=$tmp/x/usr/lib/modules
	local release
	release=$(ls "$mods")
	mkdir -p "$tmp/new"
	mv "$tmp/x/boot/vmlinuz-$release" "$tmp/new/vmlinuz"
	mv "$tmp/x/boot/config-$release" "$tmp/new/config"
	mv "$mods/$release" "$tmp/new/modules"
	echo "$release" >"$tmp/new/release"
	echo "$pkg" >"$tmp/new/package"
	# Atomic for readers: the folder appears complete or not at all.
	rm -rf "$cache"
	mv "$tmp/new" "$cache"
	rm -rf "$tmp"
	tmp=
}

tmp=
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT

names=("$@")
[ "${#names[@]}" -gt 0 ] || names=(debian12 debian13)
for n in "${names[@]}"; do
	fetch "$n"
done
