#!/bin/bash
# The guest test: a Debian kernel boots under QEMU/TCG from a qcow2 root disk
# served over vhost-user-blk, runs fio with crc32c verification plus discard
# and write-zeroes checks on a second qcow2 disk, and powers off; then both
# images must pass qemu-img check. See docs/guest.md.
#
# Usage: tests/guest/guest_test.sh BUILD_DIR
#
# Environment:
#   KVBLK_GUEST_BACKEND  kvblk or qsd. Default: kvblk when
#                        "BUILD_DIR/kvblk serve --help" works, else qsd
#                        (qemu-storage-daemon).
#   KVBLK_GUEST_IMAGES   where the cached guest images live
#                        (default: BUILD_DIR/guest-images)
#   KVBLK_GUEST_SKIP_DEPS=1  do not run deps.sh
#   and everything run_guest.sh reads (GUEST_TIMEOUT, GUEST_CONSOLE, ...).
#
# Prints TAP-like "ok - ..." / "not ok - ..." lines; exits 0 only if all pass.
set -uo pipefail
export LC_ALL=C

BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
IMAGES=${KVBLK_GUEST_IMAGES:-$BUILD/guest-images}
t0=$(date +%s)

if [ "${KVBLK_GUEST_SKIP_DEPS:-0}" != 1 ]; then
  if out=$("$HERE/deps.sh" 2>&1); then
    echo "ok - guest test dependencies are installed"
  else
    echo "not ok - guest test dependencies are installed (tests/guest/deps.sh)"
    echo "$out" | tail -n 20 | sed 's/^/    /'
    exit 1
  fi
fi

t1=$(date +%s)
if out=$("$HERE/build_images.sh" "$IMAGES" 2>&1); then
  echo "ok - guest images in $IMAGES ($(( $(date +%s) - t1 )) s: $(echo "$out" | head -1 | sed 's/^build_images: //'))"
else
  echo "not ok - guest images built in $IMAGES"
  echo "$out" | tail -n 30 | sed 's/^/    /'
  exit 1
fi

backend=${KVBLK_GUEST_BACKEND:-}
if [ -z "$backend" ]; then
  if [ -x "$BUILD/kvblk" ] && "$BUILD/kvblk" serve --help >/dev/null 2>&1; then
    backend=kvblk
  else
    backend=qsd
  fi
fi
echo "# guest back end: $backend"

BACKEND=$backend BUILD=$BUILD "$HERE/run_guest.sh" "$IMAGES"
rc=$?
echo "# guest test took $(( $(date +%s) - t0 )) s in all"
exit "$rc"
