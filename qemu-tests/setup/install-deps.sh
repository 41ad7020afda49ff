#!/usr/bin/env bash
# Installs the Debian packages the demo, tests and benchmarks need.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
pkgs=(debian-archive-keyring qemu-system-x86 qemu-utils cryptsetup-bin e2fsprogs fdisk dnsmasq-base ipxe-qemu kmod zstd xz-utils iproute2 ca-certificates etcd-server etcd-client
	# unlock/blank's tests make every format these can make on a file
	# (hfsprogs is not in Debian 12: hfs/hfs+ are not tested with real images).
	util-linux util-linux-extra xfsprogs btrfs-progs dosfstools exfatprogs ntfs-3g f2fs-tools jfsutils
	reiserfsprogs nilfs-tools erofs-utils squashfs-tools
	# The key server's PKCS#11 master key is tested against a real token.
	softhsm2 opensc
	# unlockrd-keyserver is built with cgo (PKCS#11 modules are shared libraries).
	gcc libc6-dev
	# make deb checks its packages with lintian; the real-OS tests build Debian roots.
	lintian debootstrap)
[ "$#" -gt 0 ] && pkgs+=("$@")
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: need root to install: ${missing[*]}" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || apt-get update
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
