#!/bin/bash
# Builds the guest for the vhost-user-blk test into OUTDIR:
#   OUTDIR/vmlinuz         the host's Debian kernel (copied from /boot)
#   OUTDIR/initrd.cpio.gz  static busybox, the virtio and ext4 modules, /init
#                          (init_initramfs.sh)
#   OUTDIR/root.qcow2      ext4 (label kvblk-root): busybox, fio and the shared
#                          libraries it needs, util-linux blkdiscard/fallocate,
#                          the fio jobs (fio/*.fio) and /sbin/init
#                          (init_rootfs.sh), which runs the test
#   OUTDIR/data.qcow2      an empty 128 MiB qcow2 disk for fio
#   OUTDIR/manifest        kernel version, cache key, module load order
#
# Usage: tests/guest/build_images.sh OUTDIR
#
# The images are cached: a key hashes these scripts, the fio jobs, the kernel
# version and the versions of every package whose files go into the guest.
# When OUTDIR/manifest holds the same key, nothing is rebuilt. The images are
# pristine templates; run_guest.sh runs the guest on copies.
#
# Environment: KVBLK_GUEST_KERNEL=VERSION picks a kernel from /boot (default:
# the newest /boot/vmlinuz-* with a /lib/modules directory).
set -euo pipefail
export LC_ALL=C

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

# Virtio first, in the order the transport needs them, then ext4 and what it
# needs. Dependencies found by modinfo are loaded before the module that
# needs them; a name already in the list is not repeated.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
         crc16 crc32c_generic mbcache jbd2 ext4)
DATA_SIZE=128M
ROOT_LABEL=kvblk-root

die() {
  echo "build_images: $*" >&2
  exit 1
}

for tool in modinfo mke2fs qemu-img cpio gzip busybox fio ldd sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is not installed (run tests/guest/deps.sh)"
done

# --- the kernel -----------------------------------------------------------------
KVER=${KVBLK_GUEST_KERNEL:-}
if [ -z "$KVER" ]; then
  for k in $(printf '%s\n' /boot/vmlinuz-* | sort -V -r); do
    v=${k#/boot/vmlinuz-}
    if [ -d "/lib/modules/$v" ]; then
      KVER=$v
      break
    fi
  done
fi
[ -n "$KVER" ] || die "no /boot/vmlinuz-* with modules in /lib/modules (install linux-image-amd64)"
KERNEL=/boot/vmlinuz-$KVER
[ -r "$KERNEL" ] || die "$KERNEL is missing or unreadable"
[ -d "/lib/modules/$KVER" ] || die "/lib/modules/$KVER is missing"

BUSYBOX=$(command -v busybox)
FIO=$(command -v fio)
BLKDISCARD=$(command -v blkdiscard || true)
FALLOCATE=$(command -v fallocate || true)
if [ -z "$BLKDISCARD" ] || [ -z "$FALLOCATE" ]; then
  die "util-linux blkdiscard/fallocate are missing"
fi
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked; the initramfs needs busybox-static"
fi

# --- the cache key ----------------------------------------------------------------
KEY=$( {
  cat "$HERE/build_images.sh" "$HERE/init_initramfs.sh" "$HERE/init_rootfs.sh" "$HERE"/fio/*.fio
  echo "$KVER"
  dpkg-query -W -f='${Package} ${Version}\n' "linux-image-$KVER" busybox-static fio util-linux \
    e2fsprogs libc6 qemu-utils 2>/dev/null || true
  # Every file that is copied into the guest, by size and modification time.
  # shellcheck disable=SC2046  # library paths have no spaces
  stat -L -c '%n %s %Y' "$KERNEL" "$BUSYBOX" "$FIO" "$BLKDISCARD" "$FALLOCATE" \
    $(ldd "$FIO" "$BLKDISCARD" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*[^:]$/ {print $1}' | sort -u)
} | sha256sum | cut -c1-16) || die "cannot compute the cache key (see the errors above)"

if [ -f "$OUT/manifest" ] && grep -qx "key=$KEY" "$OUT/manifest" &&
   [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.cpio.gz" ] &&
   [ -s "$OUT/root.qcow2" ] && [ -s "$OUT/data.qcow2" ]; then
  echo "build_images: $OUT is up to date (key $KEY, kernel $KVER)"
  exit 0
fi

echo "build_images: building guest images in $OUT (key $KEY, kernel $KVER)"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- modules ------------------------------------------------------------------------
ORDER=()
declare -A SEEN=()

# add_module NAME: appends NAME's dependencies (recursively), then NAME.
add_module() {
  local name=${1//-/_} deps d
  [ -n "${SEEN[$name]:-}" ] && return 0
  SEEN[$name]=1
  local file
  file=$(modinfo -k "$KVER" -F filename "$name" 2>/dev/null | head -1) ||
    die "kernel $KVER has no module $name"
  [ -n "$file" ] || die "kernel $KVER has no module $name"
  if [ "$file" = "(builtin)" ]; then
    return 0  # built into the kernel: nothing to load
  fi
  deps=$(modinfo -k "$KVER" -F depends "$name")
  for d in ${deps//,/ }; do
    add_module "$d"
  done
  ORDER+=("$file")
}
for m in "${MODULES[@]}"; do
  add_module "$m"
done

IR=$WORK/initramfs
mkdir -p "$IR"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
ln -s busybox "$IR/bin/sh"
install -m 0755 "$HERE/init_initramfs.sh" "$IR/init"
: >"$IR/lib/modules/load-order"
for file in "${ORDER[@]}"; do
  base=${file##*/}
  case "$file" in
    *.ko.xz)  base=${base%.xz};  xz -dc "$file" >"$IR/lib/modules/$base" ;;
    *.ko.zst) base=${base%.zst}; zstd -q -dc "$file" >"$IR/lib/modules/$base" ;;
    *.ko.gz)  base=${base%.gz};  gzip -dc "$file" >"$IR/lib/modules/$base" ;;
    *.ko)     cp "$file" "$IR/lib/modules/$base" ;;
    *)        die "unexpected module file $file" ;;
  esac
  echo "$base" >>"$IR/lib/modules/load-order"
done
(cd "$IR" && find . -print0 | sort -z |
   cpio --quiet --null -o -H newc -R 0:0 --reproducible) | gzip -9n >"$WORK/initrd.cpio.gz"

# --- root filesystem ---------------------------------------------------------------
R=$WORK/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/kvblk,proc,sys,dev,tmp,run,root,mnt}
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"

# copy_elf SRC DEST: copies an executable to DEST inside the rootfs and every
# shared library ldd reports for it to the same path the host loader uses.
copy_elf() {
  local src=$1 dest=$2 lib
  cp -L "$src" "$R$dest"
  while read -r lib; do
    [ -n "$lib" ] || continue
    [ -e "$R$lib" ] && continue
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] && continue
  [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
copy_elf "$FIO" /usr/bin/fio
copy_elf "$BLKDISCARD" /usr/sbin/blkdiscard
copy_elf "$FALLOCATE" /usr/bin/fallocate
install -m 0755 "$HERE/init_rootfs.sh" "$R/sbin/init"
install -m 0644 "$HERE"/fio/*.fio "$R/etc/kvblk/"
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
echo "root:x:0:" >"$R/etc/group"
echo "kvblk-guest" >"$R/etc/hostname"
echo "LABEL=$ROOT_LABEL / ext4 rw 0 1" >"$R/etc/fstab"
: >"$R/etc/ld.so.conf"

# ext4 with room to spare: the content, half again, and 32 MiB.
used_mib=$(du -sm "$R" | cut -f1)
root_mib=$((used_mib * 3 / 2 + 32))
mke2fs -q -F -t ext4 -L "$ROOT_LABEL" -E root_owner=0:0 -d "$R" "$WORK/root.raw" "${root_mib}M" \
  >/dev/null
qemu-img convert -f raw -O qcow2 "$WORK/root.raw" "$WORK/root.qcow2"
rm -f "$WORK/root.raw"
qemu-img create -q -f qcow2 "$WORK/data.qcow2" "$DATA_SIZE"
cp "$KERNEL" "$WORK/vmlinuz"

{
  echo "key=$KEY"
  echo "kernel=$KVER"
  echo "root_mib=$root_mib"
  echo "data_size=$DATA_SIZE"
  echo "modules=$(tr '\n' ' ' <"$IR/lib/modules/load-order")"
} >"$WORK/manifest"

# Move the finished set into place; the manifest goes last so an interrupted
# build is never taken for a complete one.
rm -f "$OUT/manifest"
for f in vmlinuz initrd.cpio.gz root.qcow2 data.qcow2 manifest; do
  mv -f "$WORK/$f" "$OUT/$f"
done
echo "build_images: done: rootfs ${used_mib} MiB in a ${root_mib} MiB ext4," \
  "initramfs $(du -k "$OUT/initrd.cpio.gz" | cut -f1) KiB," \
  "modules: $(sed -n 's/^modules=//p' "$OUT/manifest")"
