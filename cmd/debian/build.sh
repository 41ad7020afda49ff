#!/usr/bin/env bash
# Builds unlockrd's Debian packages from the tree with dpkg-deb (no network,
# no debhelper): unlockrd (mkunlockrd, the init, the kernel hooks) and
# unlockrd-keyserver (the server, its systemd unit and user).
#
# Usage: build.sh BIN_DIR OUT_DIR
#   BIN_DIR holds unlockrd-init, mkunlockrd and unlockrd-keyserver (make build).
# The version is 0~git<commit time>.<commit>, and every file's time is the
# commit's (SOURCE_DATE_EPOCH), so a commit gives the same packages.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: build.sh BIN_DIR OUT_DIR}
out=${2:?usage: build.sh BIN_DIR OUT_DIR}
top=$(cd "$here/../.." && pwd)

if commit=$(git -C "$top" rev-parse --short=12 HEAD 2>/dev/null); then
	epoch=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct)}
	version=0~git$(date -u -d "@$epoch" +%Y%m%d%H%M%S).$commit
else
	epoch=${SOURCE_DATE_EPOCH:-0}
	version=0~unknown
fi
export SOURCE_DATE_EPOCH=$epoch
arch=$(dpkg --print-architecture)
maintainer="unlockrd developers <dev@unlockrd.invalid>"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# install_file SRC DST MODE
install_file() { install -D -m "$3" "$1" "$2"; }

# install_tool SRC DST: a host tool, stripped as Debian ships binaries (Go
# keeps function names in its own tables, so panics still name them).
install_tool() { install_file "$1" "$2" 0755 && strip --strip-unneeded "$2"; }

# overrides PKG ROOT TAG...: lintian cannot tell Go binaries from the
# packages alone (it looks for golang-go in a source package's
# Build-Depends, and this build has no source package). They are static
# on purpose: unlockrd-init runs as PID 1 in an image with no dynamic
# loader, and the tools must run on any Debian release.
overrides() {
	local pkg=$1 root=$2 tag
	shift 2
	mkdir -p "$root/usr/share/lintian/overrides"
	for tag in "$@"; do echo "$pkg: $tag"; done >"$root/usr/share/lintian/overrides/$pkg"
}

# doc PKG: copyright and changelog, as every Debian package carries them.
doc() {
	local pkg=$1 d=$2/usr/share/doc/$1
	mkdir -p "$d"
	cat >"$d/copyright" <<C
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: unlockrd
Source: https://github.com/unlockrd/unlockrd

Files: *
Copyright: 2026 the unlockrd developers
License: unlockrd
 Built from the unlockrd source tree; see its README.md.
C
	printf '%s (%s) unstable; urgency=medium\n\n  * Built from commit %s of the unlockrd tree.\n\n -- %s  %s\n' \
		"$pkg" "$version" "${commit:-unknown}" "$maintainer" "$(date -u -R -d "@$epoch")" |
		gzip -9n >"$d/changelog.gz"
}

# manpage ROOT PAGE SECTION SUMMARY -- SECTION-TITLE COMMAND... [-- ...]:
# a man page made from the tools' own --help texts, so that it says what
# the binary in the package does (lintian wants one per command); each
# "-- TITLE COMMAND..." adds a section with that command's output.
manpage() {
	local root=$1 page=$2 sec=$3 summary=$4 title
	shift 4
	local f=$root/usr/share/man/man$sec/$page.$sec
	mkdir -p "$(dirname "$f")"
	{
		printf '.TH %s %s "%s" "unlockrd %s" "unlockrd"\n' "${page^^}" "$sec" "$(date -u -d "@$epoch" +%Y-%m-%d)" "$version"
		printf '.SH NAME\n%s \\- %s\n' "$page" "$summary"
		while [ "$#" -gt 0 ]; do
			[ "$1" = -- ] || { echo "manpage: want -- TITLE COMMAND..." >&2; return 1; }
			title=$2
			shift 2
			local cmd=()
			while [ "$#" -gt 0 ] && [ "$1" != -- ]; do cmd+=("$1"); shift; done
			printf '.SH %s\n.nf\n' "$title"
			# Help goes to stderr with a status of 0 or 2 (flag.ErrHelp).
			{ "${cmd[@]}" 2>&1 || true; } | sed -e 's/\\/\\e/g' -e "s/^[.']/\\\\\&&/"
			printf '.fi\n'
		done
		printf '.SH SEE ALSO\nThe README of the unlockrd source tree (Installing on Debian, the\noperator section) and /etc/unlockrd/unlockrd.yaml.\n'
	} >"$f"
	gzip -9n "$f"
}

# finish PKG ROOT: control metadata, md5sums, conffiles, then dpkg-deb.
finish() {
	local pkg=$1 root=$2 size
	find "$root" -path "$root/DEBIAN" -prune -o -type f -path "$root/etc/*" -printf '/%P\n' | sort >"$root/DEBIAN/conffiles"
	[ -s "$root/DEBIAN/conffiles" ] || rm "$root/DEBIAN/conffiles"
	(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
	size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
	sed -i "s/@SIZE@/$size/" "$root/DEBIAN/control"
	find "$root" -exec touch -h -d "@$epoch" {} +
	dpkg-deb --root-owner-group -Zxz --build "$root" "$out/${pkg}_${version}_${arch}.deb" >/dev/null
	echo "$out/${pkg}_${version}_${arch}.deb"
}

# unlockrd: the image builder. mkunlockrd finds unlockrd-init beside its
# own (symlink-resolved) executable, so both live in /usr/lib/unlockrd.
r=$work/unlockrd
install_tool "$bin/mkunlockrd" "$r/usr/lib/unlockrd/mkunlockrd"
install_file "$bin/unlockrd-init" "$r/usr/lib/unlockrd/unlockrd-init" 0755
install_file "$here/unlockrd/update-image" "$r/usr/lib/unlockrd/update-image" 0755
mkdir -p "$r/usr/sbin"
ln -s ../lib/unlockrd/mkunlockrd "$r/usr/sbin/mkunlockrd"
install_file "$here/unlockrd/unlockrd.yaml" "$r/etc/unlockrd/unlockrd.yaml" 0644
install_file "$here/unlockrd/postinst.d" "$r/etc/kernel/postinst.d/unlockrd" 0755
install_file "$here/unlockrd/postrm.d" "$r/etc/kernel/postrm.d/unlockrd" 0755
install_file "$here/unlockrd/kernel-install" "$r/usr/lib/kernel/install.d/50-unlockrd.install" 0755
doc unlockrd "$r"
man_args=(-- DESCRIPTION "$bin/mkunlockrd" --help)
for c in build netboot ls pin check; do
	man_args+=(-- "COMMAND ${c^^}" "$bin/mkunlockrd" "$c" -h)
done
manpage "$r" mkunlockrd 8 "build the unlockrd initramfs for a kernel" "${man_args[@]}"
overrides unlockrd "$r" "statically-linked-binary [usr/lib/unlockrd/mkunlockrd]" "statically-linked-binary [usr/lib/unlockrd/unlockrd-init]"
mkdir -p "$r/DEBIAN"
cat >"$r/DEBIAN/control" <<C
Package: unlockrd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: @SIZE@
Depends: xz-utils
Provides: linux-initramfs-tool
Conflicts: linux-initramfs-tool
Replaces: linux-initramfs-tool
Section: admin
Priority: optional
Homepage: https://github.com/unlockrd/unlockrd
Description: network-bound disk unlocking initramfs generator
 unlockrd builds the initramfs of a VM whose data and swap are LUKS2
 volumes: at boot it brings up the network, fetches the disk key over HTTPS
 from a key server trusted through a pinned public key, unlocks and mounts
 the volumes and switches root.
 .
 This package replaces the distribution's initramfs generator
 (initramfs-tools, dracut): its kernel hooks build /boot/initrd.img-VERSION
 from /etc/unlockrd/unlockrd.yaml whenever a kernel is installed.
C
finish unlockrd "$r"

# unlockrd-keyserver: the key service, its unit, its user and its flags.
r=$work/unlockrd-keyserver
install_tool "$bin/unlockrd-keyserver" "$r/usr/bin/unlockrd-keyserver"
install_file "$here/unlockrd-keyserver/unlockrd-keyserver.service" "$r/lib/systemd/system/unlockrd-keyserver.service" 0644
install_file "$here/unlockrd-keyserver/sysusers.conf" "$r/usr/lib/sysusers.d/unlockrd-keyserver.conf" 0644
install_file "$here/unlockrd-keyserver/default" "$r/etc/default/unlockrd-keyserver" 0644
doc unlockrd-keyserver "$r"
manpage "$r" unlockrd-keyserver 1 "key server for unlockrd's network-bound disk unlocking" -- DESCRIPTION "$bin/unlockrd-keyserver" --help
# The key server is linked with cgo (PKCS#11 modules are shared libraries
# it loads): its libc dependency is the newest GLIBC_ symbol version it
# uses, as dpkg-shlibdeps would compute it from libc6's symbols file.
glibc=$(objdump -T "$r/usr/bin/unlockrd-keyserver" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -n 1)
[ -n "$glibc" ] || { echo "build.sh: unlockrd-keyserver has no GLIBC_ symbol: not the cgo build" >&2; exit 1; }
mkdir -p "$r/DEBIAN"
for s in postinst prerm postrm; do
	install_file "$here/unlockrd-keyserver/$s" "$r/DEBIAN/$s" 0755
done
cat >"$r/DEBIAN/control" <<C
Package: unlockrd-keyserver
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: @SIZE@
Depends: libc6 (>= $glibc), systemd
Section: admin
Priority: optional
Homepage: https://github.com/unlockrd/unlockrd
Description: key server for unlockrd's network-bound disk unlocking
 unlockrd-keyserver keeps each enrolled host's random disk key sealed under
 a master key and hands it out over pinned HTTPS to the host's unlockrd
 initramfs, authenticated by a per-host token.
 .
 The package runs it as a hardened systemd service under its own user, with
 /var/lib/unlockrd-keyserver as its only writable path; flags go in
 /etc/default/unlockrd-keyserver.
C
finish unlockrd-keyserver "$r"
