#!/bin/sh
# Debian's kernel packages run this after removing a kernel:
#   postrm.d/unlockrd VERSION [IMAGE]
# It removes the image unlockrd built for it.
set -e
[ -x /usr/lib/unlockrd/update-image ] || exit 0
version=${1:?postrm.d/unlockrd: no kernel version}
rm -f "/boot/initrd.img-$version"
