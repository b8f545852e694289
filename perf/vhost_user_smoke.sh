#!/bin/bash
# Smoke test of the vhost-user-blk fio engine against a real back end: a short
# fio job with data verification through build/perf/fio-vhost-user.so.
#
# Usage: perf/vhost_user_smoke.sh [--backend-cmd 'CMD'] [--jobs N] [--format F] [BUILD_DIR]
#   CMD is run with {image} and {socket} replaced; it must serve the image as a
#   vhost-user-blk device on that socket. Default: qemu-storage-daemon.
#   kvblk serve:  --backend-cmd 'build/kvblk serve --socket={socket} {image}'
#   --jobs N: N fio jobs (threads) on one connection, one virtqueue each, on
#   separate 16M ranges (the back end must offer N queues).
#   --format qcow2|raw: the image made for the back end (default qcow2;
#   the default back end serves qcow2 only).
# Prints "ok - ..." / "not ok - ..." lines; exits non-zero on any failure.
set -uo pipefail

backend_cmd='qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image}
  --blockdev driver=qcow2,node-name=q,file=f
  --export type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={socket},writable=on'
build=build
jobs=1
format=qcow2
while [ $# -gt 0 ]; do
  case $1 in
    --jobs) jobs=$2; shift 2 ;;
    --format) format=$2; shift 2 ;;
    --backend-cmd) backend_cmd=$2; shift 2 ;;
    --backend-cmd=*) backend_cmd=${1#--backend-cmd=}; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) build=$1; shift ;;
  esac
done
case $format in qcow2|raw) ;; *) echo "vhost_user_smoke: --format $format: expected qcow2 or raw" >&2; exit 2 ;; esac
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

failures=0
ok() { echo "ok - $*"; }
not_ok() { echo "not ok - $*"; failures=$((failures + 1)); }

# The engine: built here, or the prebuilt one KVBLK_FIO_ENGINE names
# (make asan / make tsan pass the plain build's; see tap_engine).
TOP=$top
source "$top/tests/support/tap.sh"
tap_engine "$build"
engine=$ENGINE
for tool in fio qemu-img; do
  command -v $tool >/dev/null || { not_ok "$tool is installed"; exit 1; }
done

tmp=$(mktemp -d /tmp/kvblk-vhost-smoke.XXXXXX)
image=$tmp/disk.$format
sock=$tmp/vhost.sock
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

qemu-img create -q -f "$format" "$image" 64M
cmd=${backend_cmd//\{image\}/$image}
cmd=${cmd//\{socket\}/$sock}
# shellcheck disable=SC2086  # the command is split into words on purpose
setsid $cmd >"$tmp/backend.log" 2>&1 &
pid=$!
for _ in $(seq 150); do
  [ -S "$sock" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -S "$sock" ]; then
  ok "back end listens on its socket"
else
  not_ok "back end listens on its socket: $(tail -5 "$tmp/backend.log")"
  exit 1
fi

out=$tmp/fio.json
what="fio randrw 16M with crc32c verification through fio-vhost-user.so"
[ "$jobs" -gt 1 ] && what="$what, $jobs jobs on $jobs queues"
if timeout 120 fio --name=smoke --ioengine=external:"$engine" --filename="$sock" \
     --thread --numjobs="$jobs" --num_queues="$jobs" --offset_increment=16M --group_reporting \
     --rw=randrw --bs=4k --iodepth=8 --size=16M --verify=crc32c --do_verify=1 \
     --output-format=json --output="$out" >"$tmp/fio.log" 2>&1; then
  ok "$what"
else
  not_ok "$what: $(tail -5 "$tmp/fio.log")"
fi
if [ -s "$out" ] && python3 - "$out" "$jobs" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
ok = (job["error"] == 0 and job["write"]["io_bytes"] >= int(sys.argv[2]) * (8 << 20)
      and job["read"]["io_bytes"] > 0)
sys.exit(0 if ok else 1)
PY
then
  ok "fio reports no error, writes and reads"
else
  not_ok "fio reports no error, writes and reads"
fi

# A flush and the image left consistent once the back end has stopped.
if timeout 60 fio --name=flush --ioengine=external:"$engine" --filename="$sock" \
     --num_queues="$jobs" --rw=randwrite --bs=64k --iodepth=4 --size=4M --fsync=1 >"$tmp/fio2.log" 2>&1 &&
   grep -q 'err= 0' "$tmp/fio2.log"; then
  ok "writes with fsync=1 (VIRTIO_BLK_T_FLUSH)"
else
  not_ok "writes with fsync=1: $(tail -5 "$tmp/fio2.log")"
fi
kill -TERM "$pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if [ "$format" = raw ]; then
  # Nothing to check in a raw image but that it kept its size.
  if [ "$(stat -c %s "$image")" = $((64 << 20)) ]; then
    ok "the raw image kept its size after the back end stopped"
  else
    not_ok "the raw image kept its size: $(stat -c %s "$image") bytes"
  fi
elif qemu-img check -q "$image" >"$tmp/check.log" 2>&1; then
  ok "qemu-img check after the back end stopped"
else
  not_ok "qemu-img check after the back end stopped: $(tail -3 "$tmp/check.log")"
fi
# A back end built with a sanitizer (make tsan / make asan) reports races,
# memory errors, leaks (at exit) and undefined behaviour into its log.
sanitizer_report='WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer|runtime error:'
if grep -E -m3 "$sanitizer_report" "$tmp/backend.log" >"$tmp/sanitizer.log"; then
  not_ok "no sanitizer report in the back end's log: $(tr '\n' ' ' <"$tmp/sanitizer.log")"
else
  ok "no sanitizer report in the back end's log"
fi

[ "$failures" -eq 0 ]
