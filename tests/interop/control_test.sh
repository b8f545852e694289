#!/bin/bash
# Interop test of `kvblk serve --control` (issue 5, live snapshots and
# resize): while fio writes through the vhost-user-blk engine at queue depth
# 32, the control socket takes snapshots, lists them, grows the disk twice,
# reports info, flushes and deletes a snapshot. Afterwards qemu-img must see
# the snapshots and the new size, and `qemu-img check` must be clean. Bad
# commands get "error" lines and leave the server working.
#
# Usage: tests/interop/control_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk;
# the fio engine BUILD_DIR/perf/fio-vhost-user.so is built when missing)
#
# Prints "ok - ..." / "not ok - ..." lines (evidence indented under a
# failure); exits non-zero if any check failed.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
TOP=$(cd "$(dirname "$0")/../.." && pwd)
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img python3 fio timeout
tap_engine "${1:-build}"

# The control client: sends each argument as one line (on one connection)
# and prints one reply line per command. With HOLD=SECONDS it keeps the
# connection open that long after the replies.
cat >"$T/ctl.py" <<'PY'
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for cmd in sys.argv[2:]:
    try:
        f.write(cmd.encode() + b"\n")
        f.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass  # a refused client: the server's reply is still there to read
    line = f.readline()
    if not line:
        print("<closed>")
        sys.exit(1)
    print(line.decode().rstrip("\n"))
time.sleep(float(os.environ.get("HOLD", "0")))
PY
ctl() { timeout 120 python3 "$T/ctl.py" "$T/ctl.sock" "$@"; }

# expect_replies DESC PATTERN CMD...: every reply to the commands matches
# the extended regex PATTERN (anchored), one reply per command.
expect_replies() {
  local desc=$1 pattern=$2
  shift 2
  ctl "$@" >"$T/.evidence" 2>&1
  if [ "$(wc -l <"$T/.evidence")" -eq "$#" ] && ! grep -qvE "^($pattern)\$" "$T/.evidence"; then
    pass "$desc"
  else
    fail "$desc"
  fi
}

IMG=$T/disk.qcow2
qemu-img create -q -f qcow2 "$IMG" 256M

setsid "$KVBLK" serve --socket "$T/vhost.sock" --control "$T/ctl.sock" "$IMG" \
  >"$T/serve.log" 2>&1 &
SERVE=$!
PIDS+=("$SERVE")
if wait_for 20 test -S "$T/vhost.sock" && wait_for 5 test -S "$T/ctl.sock"; then
  pass "serve listens on the vhost-user and control sockets"
else
  cp "$T/serve.log" "$T/.evidence"
  fail "serve listens on the vhost-user and control sockets"
  exit 1
fi

expect_replies "help and info answer before any guest" 'ok .*' help info

# fio at queue depth 32 for a few seconds, through vhost-user.
timeout 120 fio --name=live --ioengine=external:"$ENGINE" --filename="$T/vhost.sock" \
  --rw=randwrite --bs=4k --iodepth=32 --size=128M --time_based --runtime=6 \
  --output-format=json --output="$T/fio.json" >"$T/fio.log" 2>&1 &
FIO=$!
PIDS+=("$FIO")
sleep 1

for i in 1 2 3; do
  expect_replies "snapshot-create s$i while fio writes" 'ok' "snapshot-create s$i"
  sleep 0.4
done
expect_replies "snapshot-list shows three snapshots" \
  'ok \[\{"id": ?"1".*"name": ?"s1".*"name": ?"s2".*"name": ?"s3".*\]' snapshot-list
expect_replies "resize +64M twice while fio writes" 'ok' "resize +64M" "resize +64M"
expect_replies "info reports the new size and three snapshots" \
  'ok \{.*"virtual-size": ?402653184,.*"snapshots": ?3,.*\}' info
expect_replies "flush" 'ok' flush
expect_replies "snapshot-delete s2" 'ok' "snapshot-delete s2"

# Bad input: one error line each, and the server goes on.
expect_replies "bad commands get error lines" 'error .+' \
  bogus "snapshot-create" "snapshot-create a b" "resize" "resize abc" "resize -1M" \
  "resize 1000" "resize 1M" "snapshot-delete nosuch" "snapshot-create s1" "" "info extra"
long=$(head -c 5000 /dev/zero | tr '\0' 'x')
expect_replies "a line over 4 KiB is refused, the next command still works" 'error line too long.*|ok' \
  "$long" flush
HOLD=8 ctl info >/dev/null 2>&1 &
HOLDER=$!
sleep 0.5
expect_replies "a second client is refused while one is connected" 'error busy.*' info
for i in $(seq 10); do ctl info >"$T/busy.$i" 2>&1 & done
wait_for 10 sh -c "[ \$(cat $T/busy.* | grep -c '^error busy') -eq 10 ]"
cat "$T"/busy.* >"$T/.evidence"
if [ "$(grep -c '^error busy' "$T/.evidence")" -eq 10 ]; then
  pass "ten more clients at once are all refused with error busy"
else
  fail "ten more clients at once are all refused with error busy"
fi
wait "$HOLDER"
expect_replies "the next client is served once the first is gone" 'ok' flush

wait "$FIO"
FIO_RC=$?
{
  echo "fio exit status $FIO_RC"
  tail -5 "$T/fio.log"
} >"$T/.evidence"
if [ "$FIO_RC" -eq 0 ] && python3 - "$T/fio.json" <<'PY'; then
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
sys.exit(0 if job["error"] == 0 and job["write"]["io_bytes"] > 0 else 1)
PY
  pass "fio finished without error"
else
  fail "fio finished without error"
fi

kill -TERM "$SERVE"
if wait_for 30 sh -c "! kill -0 $SERVE"; then
  wait "$SERVE"
  rc=$?
  cp "$T/serve.log" "$T/.evidence"
  if [ "$rc" -eq 0 ] && [ ! -e "$T/ctl.sock" ]; then
    pass "serve exits 0 on SIGTERM and removes the control socket"
  else
    echo "exit status $rc" >>"$T/.evidence"
    fail "serve exits 0 on SIGTERM and removes the control socket"
  fi
else
  fail "serve exits on SIGTERM"
fi

qemu-img snapshot -l "$IMG" >"$T/.evidence" 2>&1
if grep -qE '^1 +s1 ' "$T/.evidence" && grep -qE '^3 +s3 ' "$T/.evidence" &&
  ! grep -qE ' s2 ' "$T/.evidence"; then
  pass "qemu-img snapshot -l shows s1 and s3, not s2"
else
  fail "qemu-img snapshot -l shows s1 and s3, not s2"
fi
qemu-img info "$IMG" >"$T/.evidence" 2>&1
if grep -q '^virtual size: 384 MiB' "$T/.evidence"; then
  pass "qemu-img info shows the grown size"
else
  fail "qemu-img info shows the grown size"
fi
check "qemu-img check is clean" qemu-img check "$IMG"

# A raw image: snapshots refused with a clear message, info still works.
RAW=$T/disk.raw
qemu-img create -q -f raw "$RAW" 16M
setsid "$KVBLK" serve --socket "$T/vhost2.sock" --control "$T/ctl.sock" \
  --control-idle-timeout 1 "$RAW" >"$T/serve2.log" 2>&1 &
SERVE2=$!
PIDS+=("$SERVE2")
if wait_for 20 test -S "$T/ctl.sock"; then
  expect_replies "raw image: snapshot commands are refused clearly" \
    "error 'snapshot-(create|list)' needs a qcow2 image.*" "snapshot-create x" snapshot-list
  expect_replies "raw image: info and flush work" 'ok.*' info flush
  # A silent client is told and disconnected after the idle timeout (1 s
  # here), and the next client is served.
  timeout 30 python3 - "$T/ctl.sock" >"$T/.evidence" 2>&1 <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
f = s.makefile("rb")
print(f.readline().decode().rstrip("\n"))
print("eof" if f.readline() == b"" else "more")
PY
  if [ "$(cat "$T/.evidence")" = "$(printf 'error idle for 1 s, disconnecting\neof')" ]; then
    pass "a silent control client is disconnected after --control-idle-timeout"
  else
    fail "a silent control client is disconnected after --control-idle-timeout"
  fi
  expect_replies "the next control client is served after an idle one was dropped" 'ok' flush
else
  cp "$T/serve2.log" "$T/.evidence"
  fail "serve on a raw image listens on the control socket"
fi
kill -TERM "$SERVE2"
wait_for 30 sh -c "! kill -0 $SERVE2" && wait "$SERVE2" 2>/dev/null

"$KVBLK" serve --socket "$T/v3.sock" --control "$T/c3.sock" --control-idle-timeout 0 "$RAW" \
  >"$T/.evidence" 2>&1
rc=$?
if [ "$rc" -ne 0 ] && grep -q -- '--control-idle-timeout' "$T/.evidence" && [ ! -e "$T/v3.sock" ]; then
  pass "serve refuses --control-idle-timeout 0 with a message naming the option"
else
  fail "serve refuses --control-idle-timeout 0 with a message naming the option"
fi

# --l2-cache-size: info reports the L2 cache serve opened the image with. An
# 8 GiB disk with 64 KiB clusters has 16 L2 tables of 64 KiB: by default the
# cache covers them all (1 MiB); 200k holds three whole tables (192 KiB).
BIG=$T/big.qcow2
qemu-img create -q -f qcow2 "$BIG" 8G
l2_info() {  # l2_info DESC WANT [serve options]: starts serve, asks info, stops it
  local desc=$1 want=$2
  shift 2
  setsid "$KVBLK" serve --socket "$T/v4.sock" --control "$T/c4.sock" "$@" "$BIG" \
    >"$T/serve4.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  if wait_for 20 test -S "$T/c4.sock"; then
    timeout 60 python3 "$T/ctl.py" "$T/c4.sock" info >"$T/.evidence" 2>&1
  else
    cp "$T/serve4.log" "$T/.evidence"
  fi
  if grep -qE "^ok \{.*\"l2-cache-size\": ?$want[,}]" "$T/.evidence"; then
    pass "$desc"
  else
    fail "$desc"
  fi
  kill -TERM "$pid"
  wait_for 30 sh -c "! kill -0 $pid" && wait "$pid" 2>/dev/null
}
l2_info "by default the L2 cache covers the whole disk (info: 1 MiB)" 1048576
l2_info "--l2-cache-size 200k gives three whole tables (info: 192 KiB)" 196608 \
  --l2-cache-size 200k
l2_info "--l2-cache-size 0 is the default" 1048576 --l2-cache-size 0

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
