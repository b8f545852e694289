#!/bin/bash
# Boots the test guest (build_images.sh) under QEMU/TCG with its two disks,
# root.qcow2 and data.qcow2, each served by a vhost-user-blk back end, and
# judges the run. Prints one TAP-like line per check ("ok - ..." or
# "not ok - ...", evidence indented below) and exits 0 only if all passed.
#
# Usage: tests/guest/run_guest.sh IMAGES_DIR
#
# Environment:
#   BACKEND        qsd   qemu-storage-daemon (QEMU's own vhost-user-blk export)
#                  kvblk $BUILD/kvblk serve --once (the default is qsd, or
#                  KVBLK_GUEST_BACKEND when that is set)
#   BUILD          kvblk's build directory (default: build)
#   KVBLK_SERVE_ARGS  extra arguments for kvblk serve (e.g. "--cache none")
#   GUEST_TIMEOUT  seconds the guest may run (default 600)
#   GUEST_MEM      guest memory (default 256M)
#   GUEST_CONSOLE  1: copy the serial console to stdout while the guest runs
#   GUEST_WORKDIR  where the image copies, sockets and logs go (default: a new
#                  temporary directory, removed after a fully passing run and
#                  kept, with its path printed, otherwise)
#
# The images in IMAGES_DIR are never modified: the guest runs on copies.
set -uo pipefail
export LC_ALL=C

if [ $# -ne 1 ]; then
  echo "usage: $0 IMAGES_DIR" >&2
  exit 2
fi
IMAGES=$(cd "$1" && pwd) || exit 2
BACKEND=${BACKEND:-${KVBLK_GUEST_BACKEND:-qsd}}
BUILD=${BUILD:-build}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-600}
GUEST_MEM=${GUEST_MEM:-256M}
GUEST_CONSOLE=${GUEST_CONSOLE:-0}
DISKS=(root data)

failures=0
ok() { echo "ok - $*"; }
not_ok() {
  echo "not ok - $*"
  failures=$((failures + 1))
}
indent() { sed 's/^/    /'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

for f in vmlinuz initrd.cpio.gz root.qcow2 data.qcow2; do
  if [ ! -s "$IMAGES/$f" ]; then
    not_ok "$IMAGES/$f exists (run tests/guest/build_images.sh $IMAGES)"
    exit 1
  fi
done
for tool in qemu-system-x86_64 qemu-img timeout; do
  if ! command -v "$tool" >/dev/null; then
    not_ok "$tool is installed (run tests/guest/deps.sh)"
    exit 1
  fi
done
case "$BACKEND" in
  qsd)
    if ! command -v qemu-storage-daemon >/dev/null; then
      not_ok "qemu-storage-daemon is installed (run tests/guest/deps.sh)"
      exit 1
    fi
    ;;
  kvblk)
    KVBLK=$(cd "$BUILD" 2>/dev/null && pwd)/kvblk
    if [ ! -x "$KVBLK" ]; then
      not_ok "$BUILD/kvblk is built"
      exit 1
    fi
    ;;
  *)
    not_ok "BACKEND is qsd or kvblk (got '$BACKEND')"
    exit 1
    ;;
esac

if [ -n "${GUEST_WORKDIR:-}" ]; then
  mkdir -p "$GUEST_WORKDIR" && W=$(cd "$GUEST_WORKDIR" && pwd) || exit 1
  own_workdir=0
else
  W=$(mktemp -d /tmp/kvblk-guest.XXXXXX) || exit 1
  own_workdir=1
fi

declare -A BPID=()
cleanup() {
  local d
  for d in "${!BPID[@]}"; do
    kill "${BPID[$d]}" 2>/dev/null
  done
  wait 2>/dev/null
  if [ "$own_workdir" = 1 ] && [ "$failures" -eq 0 ] && [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$W"
  else
    echo "# logs and images kept in $W"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$(now)
echo "# backend $BACKEND, images from $IMAGES ($(sed -n 's/^kernel=//p' "$IMAGES/manifest" 2>/dev/null)), work dir $W"

# --- back ends ----------------------------------------------------------------------
# The data disk runs with DATA_QUEUES virtqueues (the guest has as many
# vCPUs, so its driver uses them all); the root disk with one.
DATA_QUEUES=${DATA_QUEUES:-2}
queues_for() { if [ "$1" = data ]; then echo "$DATA_QUEUES"; else echo 1; fi; }

start_backend() {
  local d=$1 img=$W/$1.qcow2 sock=$W/$1.sock log=$W/$1.backend.log
  rm -f "$sock"
  case "$BACKEND" in
    qsd)
      # DESIGN.md's command line, plus discard=unmap so that guest discards
      # really free qcow2 clusters (QEMU's default is to ignore them).
      qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img,discard=unmap" \
        --blockdev "driver=qcow2,node-name=q,file=f,discard=unmap" \
        --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$sock,writable=on,num-queues=$(queues_for "$d")" \
        >"$log" 2>&1 &
      ;;
    kvblk)
      # shellcheck disable=SC2086
      "$KVBLK" serve -f qcow2 --once --num-queues "$(queues_for "$d")" \
        --iothreads "$(queues_for "$d")" --control "$W/$d.ctl" ${KVBLK_SERVE_ARGS:-} \
        --socket "$sock" "$img" >"$log" 2>&1 &
      ;;
  esac
  BPID[$d]=$!
}

wait_socket() {
  local d=$1 i
  for ((i = 0; i < 300; i++)); do
    [ -S "$W/$d.sock" ] && return 0
    kill -0 "${BPID[$d]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

backends_ok=1
for d in "${DISKS[@]}"; do
  cp "$IMAGES/$d.qcow2" "$W/$d.qcow2"
  start_backend "$d"
done
for d in "${DISKS[@]}"; do
  if ! wait_socket "$d"; then
    backends_ok=0
    not_ok "$BACKEND back end for $d.qcow2 listens on $W/$d.sock"
    indent <"$W/$d.backend.log"
  fi
done
if [ "$backends_ok" = 0 ]; then
  exit 1
fi
ok "$BACKEND back ends listen for root.qcow2 and data.qcow2"

# --- the guest ------------------------------------------------------------------------
CONSOLE=$W/console.log
# shellcheck disable=SC2054  # the commas are inside QEMU option values
QEMU_ARGS=(
  -machine q35,accel=tcg,memory-backend=mem
  -object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on" -m "$GUEST_MEM"
  -smp "$DATA_QUEUES" -nodefaults -nographic -no-reboot -serial stdio -monitor none
  -kernel "$IMAGES/vmlinuz" -initrd "$IMAGES/initrd.cpio.gz"
  -append "console=ttyS0 panic=-1 rdinit=/init$([ "$BACKEND" = kvblk ] && echo ' kvblk.live_resize=1')"
)
i=0
for d in "${DISKS[@]}"; do
  QEMU_ARGS+=(-chardev "socket,id=c$i,path=$W/$d.sock"
              -device "vhost-user-blk-pci,chardev=c$i,num-queues=$(queues_for "$d")")
  i=$((i + 1))
done
echo "qemu-system-x86_64 ${QEMU_ARGS[*]}" >"$W/qemu.cmdline"

# With kvblk, grow the data disk by 64 MiB through the control socket once
# the guest says it is watching its size.
RESIZE_REPLY=$W/resize.reply
if [ "$BACKEND" = kvblk ]; then
  (
    for _ in $(seq 3000); do
      if tr -d '\r' <"$W/console.log" 2>/dev/null | grep -aq 'RESIZE-READY'; then
        python3 - "$W/data.ctl" >"$RESIZE_REPLY" 2>&1 <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(b"resize +64M\n")
print(s.makefile("rb").readline().decode().strip())
PY
        exit 0
      fi
      sleep 0.1
    done
  ) &
  RESIZER=$!
fi

t_qemu=$(now)
if [ "$GUEST_CONSOLE" = 1 ]; then
  timeout --foreground -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" </dev/null 2>"$W/qemu.err" |
    tee "$CONSOLE" | tr -d '\r' | sed -u 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'
  qemu_rc=${PIPESTATUS[0]}
else
  timeout --foreground -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" </dev/null \
    >"$CONSOLE" 2>"$W/qemu.err"
  qemu_rc=$?
fi
t_guest_end=$(now)
guest_s=$(elapsed "$t_qemu" "$t_guest_end")
# The console without carriage returns and the firmware's terminal escapes.
tr -d '\r' <"$CONSOLE" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' >"$CONSOLE.txt"

show_console_tail() {
  echo "    --- last 40 console lines ($CONSOLE) ---"
  tail -n 40 "$CONSOLE.txt" | indent
  if [ -s "$W/qemu.err" ]; then
    echo "    --- qemu stderr ---"
    indent <"$W/qemu.err"
  fi
}

if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
  not_ok "guest finished within ${GUEST_TIMEOUT} s (killed after ${guest_s} s)"
  show_console_tail
elif [ "$qemu_rc" != 0 ]; then
  not_ok "qemu-system-x86_64 exited with status 0 (got $qemu_rc after ${guest_s} s)"
  show_console_tail
else
  ok "guest ran and powered off in ${guest_s} s"
fi

boot_s=$(sed -n 's/^KVBLK-GUEST: rootfs up at \([0-9.]*\)s.*/\1/p' "$CONSOLE.txt" | head -1)
if [ -n "$boot_s" ]; then
  ok "guest booted from root.qcow2 over vhost-user-blk (root filesystem up ${boot_s} s after kernel start)"
else
  not_ok "guest booted from root.qcow2 (no 'rootfs up' line on the console)"
  show_console_tail
fi

verdict=$(grep -a '^KVBLK-GUEST-RESULT: ' "$CONSOLE.txt" | head -1)
if grep -aqE 'Kernel panic|BUG:|Oops:|blk_update_request: I/O error|I/O error, dev vd' "$CONSOLE.txt"; then
  not_ok "guest kernel logged no panic, oops or I/O error"
  grep -aE -B2 -A8 'Kernel panic|BUG:|Oops:|I/O error' "$CONSOLE.txt" | head -60 | indent
fi
nq=$(tr -d '\r' <"$CONSOLE" | sed -n 's/.*data disk [^:]*: [0-9]* MiB, \([0-9]*\) queue(s).*/\1/p' | head -1)
if [ "${nq:-0}" = "$DATA_QUEUES" ]; then
  ok "guest driver uses $nq virtqueues on the data disk"
else
  not_ok "guest driver uses $DATA_QUEUES virtqueues on the data disk (saw '${nq:-none}')"
fi
case "$verdict" in
  "KVBLK-GUEST-RESULT: PASS"*)
    ok "guest fio with crc32c verification, discard and write-zeroes passed (${verdict#KVBLK-GUEST-RESULT: })"
    ;;
  *)
    not_ok "guest fio with crc32c verification, discard and write-zeroes passed (${verdict:-no verdict line})"
    show_console_tail
    ;;
esac
if [ "$BACKEND" = kvblk ]; then
  kill "$RESIZER" 2>/dev/null
  wait "$RESIZER" 2>/dev/null
  grown=$(sed -n 's/^KVBLK-GUEST: data disk grew live from \([0-9]*\) to \([0-9]*\) sectors.*/\1 -> \2/p' \
    "$CONSOLE.txt" | head -1)
  if [ -n "$grown" ] && grep -qx ok "$RESIZE_REPLY" 2>/dev/null &&
     grep -aq 'new last MiB of the data disk is written and read back' "$CONSOLE.txt"; then
    ok "live resize +64M through kvblk serve --control reached the guest (sectors $grown) and the new end is usable"
  else
    not_ok "live resize +64M through kvblk serve --control reached the guest (control reply: $(cat "$RESIZE_REPLY" 2>/dev/null))"
    indent <"$W/data.backend.log"
  fi
fi
# The guest's own progress lines and fio summaries, for the record.
grep -a -E '^KVBLK-GUEST|^[a-z-]+: \(groupid|^ +(read|write): IOPS|^ +(READ|WRITE): bw' \
  "$CONSOLE.txt" | sed 's/^/# /'

# --- stop the back ends -----------------------------------------------------------------
for d in "${DISKS[@]}"; do
  pid=${BPID[$d]}
  if [ "$BACKEND" = qsd ]; then
    kill -TERM "$pid" 2>/dev/null
  fi
  # kvblk serve --once exits by itself once QEMU has disconnected; give it
  # (and qsd after SIGTERM) 60 s to finish requests and flush the image.
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    sleep 2
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    unset "BPID[$d]"
    not_ok "$BACKEND back end for $d.qcow2 exited by itself after the guest was gone"
    indent <"$W/$d.backend.log"
    continue
  fi
  wait "$pid"
  rc=$?
  unset "BPID[$d]"
  if [ "$rc" = 0 ]; then
    ok "$BACKEND back end for $d.qcow2 exited cleanly"
  else
    not_ok "$BACKEND back end for $d.qcow2 exited cleanly (status $rc)"
    indent <"$W/$d.backend.log"
  fi
done

# --- the images ---------------------------------------------------------------------------
for d in "${DISKS[@]}"; do
  if out=$(qemu-img check -f qcow2 "$W/$d.qcow2" 2>&1); then
    alloc=$(echo "$out" | grep -o '[0-9]*/[0-9]* = [0-9.]*% allocated' || true)
    ok "qemu-img check $d.qcow2: no errors, no leaks${alloc:+ ($alloc)}"
  else
    not_ok "qemu-img check $d.qcow2: no errors, no leaks"
    echo "$out" | head -40 | indent
  fi
done

if [ -x "${KVBLK:-}" ]; then
  echo "# kvblk info data.qcow2 after the run:"
  "$KVBLK" info "$W/data.qcow2" 2>&1 | indent
fi

total_s=$(elapsed "$t_start" "$(now)")
echo "# guest run with $BACKEND: boot to rootfs ${boot_s:-?} s (guest clock), guest ${guest_s} s, total ${total_s} s"
[ "$failures" -eq 0 ]
