#!/bin/sh
# /sbin/init of the guest's root filesystem (build_images.sh copies it into
# root.qcow2). It is the whole guest-side test: it finds the data disk (the
# virtio disk that is not the root), runs fio with crc32c verification on it,
# discards and zeroes ranges and checks they read back as zeros, writes a file
# through ext4 on the root disk, and then prints exactly one verdict line
#   KVBLK-GUEST-RESULT: PASS ...   or   KVBLK-GUEST-RESULT: FAIL <reason>
# before syncing and powering off. run_guest.sh reads that line from the
# serial console.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
MiB=1048576
# Debian's static busybox runs its own applets before anything on PATH, and
# its blkdiscard and fallocate lack -z and -p: name util-linux's explicitly.
BLKDISCARD=/usr/sbin/blkdiscard
FALLOCATE=/usr/bin/fallocate

mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=32m tmpfs /tmp
# Only errors and worse from the kernel on the console, so that our lines
# stay readable; an I/O error still shows.
echo "4 4 1 7" >/proc/sys/kernel/printk

say() { echo "KVBLK-GUEST: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

finish() {
  sync
  mount -o remount,ro / 2>/dev/null
  sync
  say "powering off at $(uptime_s)s"
  poweroff -f
  sleep 5
  exit 1
}

fail() {
  echo "KVBLK-GUEST-RESULT: FAIL $*"
  finish
}

say "rootfs up at $(uptime_s)s on ${KVBLK_ROOT_DEV:-?} (kernel $(uname -r))"

# --- the data disk -----------------------------------------------------------
root_name=${KVBLK_ROOT_DEV##*/}
data_name=""
for d in /sys/block/vd*; do
  [ -e "$d" ] || continue
  n=${d##*/}
  [ "$n" = "$root_name" ] && continue
  data_name=$n
  break
done
[ -n "$data_name" ] || fail "no second virtio disk (have: $(echo /sys/block/* | sed 's|/sys/block/||g'))"
DATA=/dev/$data_name
Q=/sys/block/$data_name/queue
sectors=$(cat "/sys/block/$data_name/size")
size_mib=$((sectors * 512 / MiB))
disc_max=$(cat "$Q/discard_max_bytes" 2>/dev/null || echo 0)
wz_max=$(cat "$Q/write_zeroes_max_bytes" 2>/dev/null || echo 0)
nq=$(find "/sys/block/$data_name/mq" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
say "data disk $DATA: ${size_mib} MiB, $nq queue(s), discard_max_bytes=$disc_max write_zeroes_max_bytes=$wz_max"
[ "$size_mib" -ge 64 ] || fail "data disk $DATA is only ${size_mib} MiB, need 64"

# --- fio engine ----------------------------------------------------------------
ENGINE=""
for e in io_uring libaio psync; do
  if fio --name=probe --filename="$DATA" --ioengine=$e --rw=read --bs=4k --size=4k \
      --direct=1 --output=/dev/null >/dev/null 2>&1; then
    ENGINE=$e
    break
  fi
done
[ -n "$ENGINE" ] || fail "fio cannot read $DATA with io_uring, libaio or psync"
say "fio $(fio --version) using ioengine=$ENGINE"
export KVBLK_DATA="$DATA" KVBLK_ENGINE="$ENGINE"

# Runs one fio job file; prints fio's per-job and group summary lines on
# success and fio's whole output on failure.
run_fio() {
  job=$1
  log=/tmp/${job##*/}.log
  say "fio $job started at $(uptime_s)s"
  if fio --eta=never --output="$log" "$job"; then
    grep -E '^[a-z-]+: \(groupid|^ +(read|write|trim): IOPS|^ +(READ|WRITE|TRIM): bw|err=' "$log"
    say "fio $job passed at $(uptime_s)s"
    return 0
  fi
  cat "$log"
  return 1
}

run_fio /etc/kvblk/fill.fio || fail "fio fill.fio (sequential write + crc32c verify)"
run_fio /etc/kvblk/randrw.fio || fail "fio randrw.fio (mixed random read/write + crc32c verify)"

# --- discard and write zeroes on 32..48 MiB (filled with data by fill.fio) ----
# Reads LEN bytes of the data disk at OFF, bypassing the page cache, and
# succeeds only if they are all zero.
is_zero() {
  off_mib=$1
  len_mib=$2
  dd if="$DATA" of=/tmp/chunk bs=$MiB skip="$off_mib" count="$len_mib" iflag=direct \
    status=none || return 1
  cmp -s -n $((len_mib * MiB)) /tmp/chunk /dev/zero
}

is_zero 32 16 && fail "32..48 MiB already reads as zeros: fill.fio wrote nothing there"

if [ "$disc_max" -gt 0 ]; then
  $BLKDISCARD -o $((32 * MiB)) -l $((4 * MiB)) "$DATA" || fail "blkdiscard 32 MiB +4 MiB"
  say "discard 32 MiB +4 MiB ok (contents after discard are unspecified)"
else
  say "discard skipped: the device offers no discard"
fi

# BLKZEROOUT: WRITE_ZEROES without unmap when offered, else the kernel writes zeros.
$BLKDISCARD -z -o $((36 * MiB)) -l $((4 * MiB)) "$DATA" || fail "blkdiscard -z 36 MiB +4 MiB"
is_zero 36 4 || fail "36..40 MiB does not read as zeros after blkdiscard -z"
say "zero-out 36 MiB +4 MiB reads back as zeros"

# Punch hole on a block device: WRITE_ZEROES with unmap allowed, no fallback.
if [ "$wz_max" -gt 0 ]; then
  $FALLOCATE -p -o $((40 * MiB)) -l $((4 * MiB)) "$DATA" || fail "fallocate -p 40 MiB +4 MiB"
  is_zero 40 4 || fail "40..44 MiB does not read as zeros after fallocate --punch-hole"
  say "punch-hole 40 MiB +4 MiB reads back as zeros"
  $FALLOCATE -z -o $((44 * MiB)) -l $((4 * MiB)) "$DATA" || fail "fallocate -z 44 MiB +4 MiB"
  is_zero 44 4 || fail "44..48 MiB does not read as zeros after fallocate --zero-range"
  say "zero-range 44 MiB +4 MiB reads back as zeros"
else
  say "punch-hole/zero-range skipped: the device offers no write zeroes"
fi

# The discarded and zeroed ranges must take new data again.
run_fio /etc/kvblk/rewrite.fio || fail "fio rewrite.fio (random write + verify over discarded range)"

# --- a file through ext4 on the root disk --------------------------------------
dd if=/dev/urandom of=/root/blob bs=$MiB count=4 status=none || fail "writing /root/blob"
sum1=$(md5sum </root/blob)
sync
echo 3 >/proc/sys/vm/drop_caches
sum2=$(md5sum </root/blob)
[ "$sum1" = "$sum2" ] || fail "/root/blob changed after sync and drop_caches"
rm -f /root/blob
say "4 MiB file on the root filesystem written, synced and read back"

# --- a live resize (kvblk only: the host grows the data disk through
# `kvblk serve --control`; the back end tells QEMU, QEMU tells the guest) -----
if grep -q 'kvblk.live_resize=1' /proc/cmdline; then
  before=$(cat "/sys/block/$data_name/size")
  say "RESIZE-READY sectors=$before"
  after=$before
  for _ in $(seq 600); do
    after=$(cat "/sys/block/$data_name/size")
    [ "$after" != "$before" ] && break
    sleep 0.1
  done
  [ "$after" -gt "$before" ] ||
    fail "data disk still has $after sectors 60 s after the host was asked to grow it"
  say "data disk grew live from $before to $after sectors"
  dd if=/dev/urandom of=/tmp/tail bs=$MiB count=1 status=none
  dd if=/tmp/tail of="$DATA" bs=$MiB seek=$(((after * 512 / MiB) - 1)) oflag=direct \
    status=none || fail "writing the last MiB of the grown disk"
  dd if="$DATA" of=/tmp/back bs=$MiB skip=$(((after * 512 / MiB) - 1)) count=1 iflag=direct \
    status=none || fail "reading the last MiB of the grown disk"
  cmp -s /tmp/tail /tmp/back || fail "the last MiB of the grown disk does not read back"
  say "the new last MiB of the data disk is written and read back"
fi

echo "KVBLK-GUEST-RESULT: PASS engine=$ENGINE data=$DATA uptime=$(uptime_s)s"
finish
