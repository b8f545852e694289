#!/bin/bash
# Installs what the guest test needs: QEMU (system emulator, storage daemon,
# qemu-img), a Debian kernel with its modules, busybox, fio, e2fsprogs and the
# tools that pack an initramfs. Idempotent: when everything is present it only
# checks; it runs apt-get update itself, and only when something is missing.
#
# Bookworm's 6.1 kernel ships plain .ko modules. busybox insmod loads only
# those, so build_images.sh unpacks .ko.xz/.ko.zst/.ko.gz modules while it packs
# the initramfs; xz-utils and zstd are here for kernels that compress them.
set -euo pipefail

PKGS=(
  qemu-system-x86 qemu-system-common qemu-utils
  linux-image-amd64 kmod
  busybox-static fio e2fsprogs
  cpio gzip xz-utils zstd
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
echo "guest deps: installing ${missing[*]}"
$SUDO apt-get update -qq
# INITRD=No tells the kernel's postinst hook (/etc/kernel/postinst.d/
# initramfs-tools) not to build a host initramfs: that takes minutes and the
# guest test builds its own small one. Without a host initrd the
# initramfs-tools trigger finds nothing to update either.
$SUDO env INITRD=No DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
