#!/bin/bash
# The vhost-user-blk fio engine (build/perf/fio-vhost-user.so) runs a short
# verified fio job against both back ends: qemu-storage-daemon and kvblk serve
# (also with two queues on two I/O threads, and on a raw image).
# Arg: build dir. Prints ok/not ok lines; exits non-zero on failure.
set -uo pipefail
build=${1:-build}
cd "$(dirname "$0")/../.."
# fio and qemu-storage-daemon come with the guest harness's packages.
tests/guest/deps.sh >/dev/null || { echo "not ok - install fio and qemu-storage-daemon"; exit 1; }
rc=0
echo "# back end: qemu-storage-daemon"
perf/vhost_user_smoke.sh "$build" || rc=1
echo "# back end: kvblk serve"
perf/vhost_user_smoke.sh --backend-cmd "$build/kvblk serve --socket={socket} {image}" \
  "$build" || rc=1
echo "# back end: kvblk serve, 2 queues on 2 I/O threads"
perf/vhost_user_smoke.sh --jobs 2 \
  --backend-cmd "$build/kvblk serve --num-queues 2 --iothreads 2 --socket={socket} {image}" \
  "$build" || rc=1
echo "# back end: kvblk serve, a raw image"
perf/vhost_user_smoke.sh --format raw \
  --backend-cmd "$build/kvblk serve --format raw --socket={socket} {image}" "$build" || rc=1
exit $rc
