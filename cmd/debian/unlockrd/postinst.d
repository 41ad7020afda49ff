#!/bin/sh
# Debian's kernel packages run this after installing a kernel:
#   postinst.d/unlockrd VERSION [IMAGE]
# It builds /boot/initrd.img-VERSION with unlockrd (see update-image).
set -e
# Left behind after `apt remove unlockrd` (hooks are conffiles): do nothing.
[ -x /usr/lib/unlockrd/update-image ] || exit 0
# kernel-package's make-kpkg sets INITRD=No for kernels without an initramfs.
[ "${INITRD:-}" != No ] || exit 0
version=${1:?postinst.d/unlockrd: no kernel version}
exec /usr/lib/unlockrd/update-image "$version"
