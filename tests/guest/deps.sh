#!/bin/bash
# Installs what the guest test needs: QEMU (system emulator, storage daemon,
# qemu-img), a Debian kernel with its modules, busybox, fio, e2fsprogs and the
# tools that pack an initramfs. Idempotent: when everything is present it only
# checks; it runs apt-get update itself, and only when something is missing.
#
# Debian bookworm ships kernel modules as .ko.xz; build_images.sh unpacks them
# with xz (xz-utils) because busybox insmod loads only plain .ko files. zstd is
# installed too so a kernel that uses .ko.zst works the same way.
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
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
