#!/bin/sh
# /init of the guest's initramfs (build_images.sh packs it with a static
# busybox and the kernel modules listed in /lib/modules/load-order).
#
# Loads the virtio and ext4 modules in order, finds the ext4 filesystem
# labelled kvblk-root (normally /dev/vda), mounts it read-write and hands over
# to its /sbin/init with switch_root. On any failure it prints
# "KVBLK-GUEST-RESULT: FAIL ..." and powers the machine off, so the host sees a
# verdict instead of waiting for its timeout.

PATH=/bin
export PATH

/bin/busybox mkdir -p /dev /proc /sys /newroot
/bin/busybox mount -t devtmpfs devtmpfs /dev
# The kernel found no /dev/console in the cpio archive; take the console now.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "KVBLK-GUEST: $*"; }

fail() {
  echo "KVBLK-GUEST-RESULT: FAIL initramfs: $*"
  sync
  poweroff -f
  # Still here: leaving PID 1 panics the kernel, and panic=-1 with QEMU's
  # -no-reboot ends the machine either way.
  exit 1
}

say "initramfs at $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"

loaded=0
while read -r mod; do
  [ -n "$mod" ] || continue
  if insmod "/lib/modules/$mod"; then
    loaded=$((loaded + 1))
  else
    fail "insmod $mod failed"
  fi
done </lib/modules/load-order
say "loaded $loaded modules"

# Wait for the root filesystem: virtio-blk probes asynchronously.
root=""
i=0
while [ $i -lt 300 ]; do
  root=$(findfs LABEL=kvblk-root 2>/dev/null) && [ -b "$root" ] && break
  root=""
  usleep 100000
  i=$((i + 1))
done
if [ -z "$root" ]; then
  ls -l /sys/block
  fail "no block device with the label kvblk-root after 30 s"
fi

mount -t ext4 -o rw "$root" /newroot || fail "mount -t ext4 $root failed"
[ -x /newroot/sbin/init ] || fail "$root has no executable /sbin/init"
say "root filesystem $root mounted, switching root"

KVBLK_ROOT_DEV=$root
export KVBLK_ROOT_DEV
umount /proc
umount /sys
mount --move /dev /newroot/dev || fail "mount --move /dev failed"
# shellcheck disable=SC2093  # the next line runs only if exec failed
exec switch_root /newroot /sbin/init
fail "switch_root failed"
