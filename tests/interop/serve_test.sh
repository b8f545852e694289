#!/bin/bash
# Interop tests of `kvblk serve` (the vhost-user-blk back end): its command
# line, socket handling and shutdown, judged by qemu-img / qemu-io. A small
# vhost-user front end in Python (memfd guest memory, one split virtqueue)
# writes through the server; booting a guest is tests/guest/'s job.
#
# Usage: tests/interop/serve_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk)
#
# Every check prints "ok - <description>" or "not ok - <description>" (with
# the evidence indented under it); the script exits non-zero if any check
# failed. Everything lives in a temporary directory removed on exit, and
# every server started here is killed on exit.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io python3 timeout

# fails_with DESC TEXT CMD...: CMD exits 1 and prints exactly one line on
# stderr, "kvblk serve: ..." containing TEXT, and nothing on stdout.
fails_with() {
  local desc=$1 text=$2
  shift 2
  local rc=0
  timeout 20 "$@" >"$T/.out" 2>"$T/.err" || rc=$?
  {
    echo "exit status $rc"
    echo "stdout:"
    cat "$T/.out"
    echo "stderr:"
    cat "$T/.err"
  } >"$T/.evidence"
  if [ "$rc" -eq 1 ] && [ ! -s "$T/.out" ] && [ "$(wc -l <"$T/.err")" -eq 1 ] &&
    grep -q '^kvblk serve: ' "$T/.err" && grep -qF -- "$text" "$T/.err"; then
    pass "$desc"
  else
    fail "$desc"
  fi
}


alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }

# start_server LOG ARGS...: starts kvblk serve in the background; sets PID.
start_server() {
  local log=$1
  shift
  "$KVBLK" serve "$@" >"$log" 2>&1 &
  PID=$!
  PIDS+=("$PID")
}

# stop_server PID SIGNAL: sends SIGNAL and waits; sets RC to the exit status.
stop_server() {
  kill "-$2" "$1" 2>/dev/null
  if wait_for 20 dead "$1"; then
    wait "$1"
    RC=$?
  else
    RC=timeout
  fi
}

# A vhost-user front end: connects to $1 and runs scenario $2.
cat >"$T/frontend.py" <<'EOF'
import ctypes, mmap, os, socket, struct, sys, time

path, scenario = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)

def send(req, payload=b"", fds=(), need_reply=False):
    msg = struct.pack("<III", req, 1 | (8 if need_reply else 0), len(payload)) + payload
    if fds:
        socket.send_fds(s, [msg], list(fds))
    else:
        s.sendall(msg)

def recvall(n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            sys.exit("server closed the connection")
        out += chunk
    return out

def recv(req):
    r, flags, size = struct.unpack("<III", recvall(12))
    assert r == req and flags == 5, (r, flags)
    return recvall(size)

def get_u64(req):
    send(req)
    return struct.unpack("<Q", recv(req))[0]

def ack(req, payload=b"", fds=()):
    send(req, payload, fds, True)
    v = struct.unpack("<Q", recv(req))[0]
    assert v == 0, "request %d refused" % req

features = get_u64(1)                                  # GET_FEATURES
assert features & (1 << 30) and features & (1 << 32), hex(features)
proto = get_u64(15)                                    # GET_PROTOCOL_FEATURES
assert proto & (1 << 9) and proto & (1 << 3), hex(proto)  # CONFIG, REPLY_ACK
send(16, struct.pack("<Q", proto))                     # SET_PROTOCOL_FEATURES
send(3)                                                # SET_OWNER
send(24, struct.pack("<III", 0, 8, 0) + bytes(8))      # GET_CONFIG capacity
capacity = struct.unpack("<Q", recv(24)[12:20])[0]
if scenario == "capacity":
    print(capacity)
    sys.exit(0)

# Guest RAM: 1 MiB memfd at guest physical 1 MiB.
SIZE, GPA = 1 << 20, 1 << 20
fd = os.memfd_create("guest")
os.ftruncate(fd, SIZE)
mem = mmap.mmap(fd, SIZE)
uva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
ack(2, struct.pack("<Q", features & ~(1 << 29)))        # SET_FEATURES (no EVENT_IDX)
ack(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA, SIZE, uva, 0), [fd])
QSIZE, DESC, AVAIL, USED = 8, 0x0, 0x1000, 0x2000
ack(8, struct.pack("<II", 0, QSIZE))                   # SET_VRING_NUM
ack(10, struct.pack("<II", 0, 0))                      # SET_VRING_BASE
ack(9, struct.pack("<IIQQQQ", 0, 0, uva + DESC, uva + USED, uva + AVAIL, 0))
kick, call = os.eventfd(0), os.eventfd(0)
ack(13, struct.pack("<Q", 0), [call])                  # SET_VRING_CALL
ack(12, struct.pack("<Q", 0), [kick])                  # SET_VRING_KICK
ack(18, struct.pack("<II", 0, 1))                      # SET_VRING_ENABLE

def request(n, rtype, sector, data_len):
    """Publishes request n (three descriptors) and waits for it."""
    hdr, data, status = 0x3000, 0x10000, 0x4000
    mem[hdr:hdr + 16] = struct.pack("<IIQ", rtype, 0, sector)
    mem[status] = 0xFF
    d = [(GPA + hdr, 16, 1, 1)]
    if data_len:
        d.append((GPA + data, data_len, 1 | (2 if rtype == 0 else 0), 2))
    d.append((GPA + status, 1, 2, 0))
    for i, (addr, ln, flags, nxt) in enumerate(d):
        mem[DESC + 16 * i:DESC + 16 * i + 16] = struct.pack("<QIHH", addr, ln, flags, nxt)
    mem[AVAIL + 4 + 2 * (n % QSIZE):AVAIL + 6 + 2 * (n % QSIZE)] = struct.pack("<H", 0)
    mem[AVAIL + 2:AVAIL + 4] = struct.pack("<H", n + 1)
    os.eventfd_write(kick, 1)
    deadline = time.time() + 20
    while struct.unpack("<H", mem[USED + 2:USED + 4])[0] != n + 1:
        assert time.time() < deadline, "request %d not completed" % n
        time.sleep(0.01)
    assert mem[status] == 0, "status %d" % mem[status]

if scenario == "write":
    mem[0x10000:0x10000 + 65536] = b"\x5a" * 65536
    request(0, 1, 2048, 65536)      # OUT 64 KiB at 1 MiB
    request(1, 4, 0, 0)             # FLUSH
    request(2, 0, 2048, 65536)      # IN, read back
    assert mem[0x10000:0x10000 + 65536] == b"\x5a" * 65536
    print("ok")
EOF

qemu-img create -q -f qcow2 disk.qcow2 64M

# ---- Help and option errors ----------------------------------------------

"$KVBLK" serve --help >help.txt 2>&1
rc=$?
: >"$T/.evidence"
missing=""
for opt in --socket --format --read-only --num-queues --iothreads --cache --l2-cache-size --serial \
  --once --help; do
  grep -q -- "$opt" help.txt || missing="$missing $opt"
done
cp help.txt "$T/.evidence"
if [ "$rc" -eq 0 ] && [ -z "$missing" ] && grep -q "queue i runs on thread i mod N" help.txt; then
  pass "serve --help explains every option"
else
  echo "missing:$missing" >>"$T/.evidence"
  fail "serve --help explains every option"
fi
check "kvblk help serve prints the same help" cmp help.txt <("$KVBLK" help serve)
check "kvblk --help lists serve" grep -q '^  serve ' <("$KVBLK" --help)

fails_with "an unknown option is refused" "--bogus" "$KVBLK" serve --bogus --socket s disk.qcow2
fails_with "--socket is required" "--socket" "$KVBLK" serve disk.qcow2
fails_with "IMAGE is required" "IMAGE" "$KVBLK" serve --socket s
fails_with "a second IMAGE is refused" "unexpected argument" "$KVBLK" serve --socket s disk.qcow2 x
fails_with "--num-queues 0 is refused" "num-queues" "$KVBLK" serve --num-queues 0 --socket s disk.qcow2
fails_with "--num-queues 257 is refused" "num-queues" "$KVBLK" serve --num-queues 257 --socket s disk.qcow2
fails_with "--num-queues abc is refused" "num-queues" "$KVBLK" serve --num-queues abc --socket s disk.qcow2
fails_with "--iothreads 0 is refused" "iothreads" "$KVBLK" serve --iothreads 0 --socket s disk.qcow2
fails_with "--l2-cache-size abc is refused" "invalid --l2-cache-size 'abc'" \
  "$KVBLK" serve --l2-cache-size abc --socket s disk.qcow2
fails_with "--l2-cache-size above 64G is refused" "up to 64G" \
  "$KVBLK" serve --l2-cache-size 65G --socket s disk.qcow2
fails_with "a negative --l2-cache-size is refused" "invalid --l2-cache-size '-1M'" \
  "$KVBLK" serve --l2-cache-size -1M --socket s disk.qcow2
fails_with "an unknown cache mode is refused" "cache mode 'sometimes'" \
  "$KVBLK" serve --cache sometimes --socket s disk.qcow2
fails_with "an unknown format is refused" "vmdk" "$KVBLK" serve -f vmdk --socket s disk.qcow2
fails_with "a serial longer than 20 bytes is refused" "serial" \
  "$KVBLK" serve --serial 123456789012345678901 --socket s disk.qcow2
fails_with "a missing image is refused" "missing.qcow2" "$KVBLK" serve --socket s missing.qcow2
fails_with "a raw image opened as qcow2 is refused" "qcow2" \
  "$KVBLK" serve -f qcow2 --socket s help.txt
touch not-a-socket
fails_with "a socket path that is a regular file is refused" "not a socket" \
  "$KVBLK" serve --socket not-a-socket disk.qcow2
check "the regular file is left alone" test -f not-a-socket
fails_with "an overlong socket path is refused" "socket path" \
  "$KVBLK" serve --socket "$T/$(printf 'x%.0s' $(seq 120))" disk.qcow2
check "no socket is left behind by the failures" test ! -e s

# ---- Socket creation, a second server, SIGTERM --------------------------------

start_server serve1.log --num-queues 2 --iothreads 4 --socket "$T/vhost.sock" disk.qcow2
S1=$PID
if wait_for 20 test -S "$T/vhost.sock"; then
  pass "serve creates the socket"
else
  cp serve1.log "$T/.evidence"
  fail "serve creates the socket"
fi
fails_with "a socket in use by another server is refused" "in use" \
  "$KVBLK" serve --socket "$T/vhost.sock" disk.qcow2
check "the first server is still running after that" alive "$S1"
check "the first server's socket is still there" test -S "$T/vhost.sock"
check "a front end reads the capacity from the config space" \
  test "$(timeout 20 python3 frontend.py "$T/vhost.sock" capacity)" = $((64 * 1024 * 1024 / 512))
stop_server "$S1" TERM
echo "exit status $RC" >"$T/.evidence"
cat serve1.log >>"$T/.evidence"
if [ "$RC" = 0 ]; then pass "SIGTERM shuts down with status 0"; else fail "SIGTERM shuts down with status 0"; fi
check "SIGTERM removes the socket" test ! -e "$T/vhost.sock"
check "qemu-img check is clean after SIGTERM" qemu-img check -q disk.qcow2

# ---- Writing through the server, --once -----------------------------------------

start_server serve2.log --once --socket "$T/w.sock" disk.qcow2
S2=$PID
wait_for 20 test -S "$T/w.sock"
check "a front end writes, flushes and reads back through the ring" \
  test "$(timeout 60 python3 frontend.py "$T/w.sock" write)" = ok
if wait_for 20 dead "$S2"; then
  wait "$S2"
  RC=$?
else
  RC=timeout
fi
echo "exit status $RC" >"$T/.evidence"
cat serve2.log >>"$T/.evidence"
if [ "$RC" = 0 ]; then pass "--once exits 0 after the front end disconnects"; else fail "--once exits 0 after the front end disconnects"; fi
check "--once removes the socket" test ! -e "$T/w.sock"
check "qemu-img check is clean after the write" qemu-img check -q disk.qcow2
check "qemu-io reads the written data" \
  bash -c "qemu-io -f qcow2 -c 'read -P 0x5a 1M 64k' disk.qcow2 | grep -q 'read 65536/65536'"
check "the rest of the disk is still zero" \
  bash -c "qemu-io -f qcow2 -c 'read -P 0 0 1M' -c 'read -P 0 1088k 1M' disk.qcow2 | grep -c 'read 1048576/1048576' | grep -q 2"

# ---- SIGINT, stale sockets, read-only ------------------------------------------------

start_server serve3.log --read-only --cache none --socket "$T/r.sock" disk.qcow2
S3=$PID
wait_for 20 test -S "$T/r.sock"
kill -KILL "$S3"
wait "$S3" 2>/dev/null
check "a killed server leaves its socket behind" test -S "$T/r.sock"
start_server serve4.log --read-only --socket "$T/r.sock" disk.qcow2
S4=$PID
if wait_for 20 grep -q "listening" serve4.log && alive "$S4"; then
  pass "a stale socket is replaced"
else
  cp serve4.log "$T/.evidence"
  fail "a stale socket is replaced"
fi
check "a front end connects to the read-only server" \
  test "$(timeout 20 python3 frontend.py "$T/r.sock" capacity)" = $((64 * 1024 * 1024 / 512))
cp serve4.log "$T/.evidence"
if wait_for 20 grep -q "front end disconnected" serve4.log && alive "$S4" &&
  ! grep -q "failed" serve4.log; then
  pass "the read-only server survives a disconnect and waits for the next front end"
else
  fail "the read-only server survives a disconnect and waits for the next front end"
fi
stop_server "$S4" INT
echo "exit status $RC" >"$T/.evidence"
cat serve4.log >>"$T/.evidence"
if [ "$RC" = 0 ]; then pass "SIGINT shuts down with status 0"; else fail "SIGINT shuts down with status 0"; fi
check "SIGINT removes the socket" test ! -e "$T/r.sock"
check "qemu-img check is clean at the end" qemu-img check -q disk.qcow2

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
