#!/bin/bash
# Benchmark (issue 5): how long guest requests wait during a live internal
# snapshot of a fully allocated 8 GiB qcow2 image with 64 KiB clusters.
#
# kvblk serve exports the image (every cluster mapped: preallocation=metadata,
# so the snapshot has 131072 data clusters and 16 L2 tables to reference);
# fio writes 4 KiB blocks at random through the vhost-user engine at queue
# depth 32 and logs every completion latency; after a warm-up the control
# socket takes SNAPS snapshots, one every GAP seconds. Reported: each
# snapshot's time as the control client saw it, the largest completion
# latency of requests that overlapped a snapshot, and latency percentiles of
# requests away from any snapshot (the baseline), all from one run.
#
# Usage: perf/live_snapshot_bench.sh [BUILD_DIR] [OUT.md]
#   defaults: build, perf/results/live_snapshot.md. Env: SNAPS (5), GAP (2 s).
set -uo pipefail

BUILD=${1:-build}
TOP=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$TOP/perf/results/live_snapshot.md}
SNAPS=${SNAPS:-5}
GAP=${GAP:-2}
KVBLK=$(cd "$BUILD" && pwd)/kvblk
ENGINE=
for e in "$BUILD/perf/fio-vhost-user.so" "$TOP/build/perf/fio-vhost-user.so"; do
  [ -f "$e" ] && { ENGINE=$(cd "$(dirname "$e")" && pwd)/$(basename "$e"); break; }
done
[ -n "$ENGINE" ] || { echo "fio-vhost-user.so is not built (make -f perf/Makefile perf)"; exit 1; }

T=$(mktemp -d /tmp/kvblk-live-snap.XXXXXX)
SERVE=
cleanup() {
  [ -n "$SERVE" ] && kill -KILL "$SERVE" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

IMG=$T/disk.qcow2
phase() { echo "$1 $SECONDS" >>"$T/phases.txt"; }
SECONDS=0
"$KVBLK" create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$IMG" 8G ||
  { echo "create failed"; exit 1; }
phase created
setsid "$KVBLK" serve --socket "$T/vhost.sock" --control "$T/ctl.sock" "$IMG" \
  >"$T/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 100); do [ -S "$T/ctl.sock" ] && [ -S "$T/vhost.sock" ] && break; sleep 0.1; done

RUNTIME=$((3 + SNAPS * (GAP + 1) + 3))
(cd "$T" && fio --name=live --ioengine=external:"$ENGINE" --filename="$T/vhost.sock" \
  --rw=randwrite --bs=4k --iodepth=32 --size=8G --time_based --runtime="$RUNTIME" \
  --write_lat_log=lat --log_avg_msec=0 --output-format=json --output="$T/fio.json" \
  >"$T/fio.log" 2>&1) &
FIO=$!

# The control client: takes the snapshots and prints, per snapshot, the
# time fio's clock would give it (ms since fio started, approximated by the
# client's own start) and how long the command took.
python3 - "$T/ctl.sock" "$SNAPS" "$GAP" >"$T/snaps.txt" <<'PY'
import socket, sys, time
path, snaps, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
time.sleep(3)
for i in range(snaps):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")
    start = time.monotonic()
    f.write(b"snapshot-create bench%d\n" % i)
    f.flush()
    reply = f.readline().decode().strip()
    end = time.monotonic()
    print("%.1f %.1f %s" % ((start - t0) * 1000, (end - t0) * 1000, reply))
    f.close()  # the socket stays open while its file object lives
    s.close()
    time.sleep(gap)
PY
wait "$FIO"
FIO_RC=$?
# The same operation with no load, for comparison (no dirty data to sync).
IDLE_MS=$(python3 - "$T/ctl.sock" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile("rwb")
start = time.monotonic()
f.write(b"snapshot-create idle\n")
f.flush()
reply = f.readline().decode().strip()
print("%.1f (%s)" % ((time.monotonic() - start) * 1000, reply))
PY
)
phase fio-done
kill -TERM "$SERVE"
wait "$SERVE"
SERVE=
phase serve-stopped
qemu-img check -q "$IMG" >"$T/check.log" 2>&1
CHECK_RC=$?
phase checked

python3 - "$T" "$OUT" "$FIO_RC" "$CHECK_RC" "$SNAPS" "$IDLE_MS" <<'PY'
import glob, json, os, sys, time
t, out, fio_rc, check_rc, snaps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
idle_ms = sys.argv[6]
windows = []
for line in open(os.path.join(t, "snaps.txt")):
    a, b, reply = line.split(" ", 2)
    windows.append((float(a), float(b), reply.strip()))
lat = []  # (completion time ms, latency us)
for name in glob.glob(os.path.join(t, "lat_clat*.log")):
    for line in open(name):
        f = [x.strip() for x in line.split(",")]
        lat.append((int(f[0]), int(f[1]) / 1000.0))
# fio's log clock and the client's clock both start within ~tens of ms of
# each other; a request counts as "during" a snapshot when its completion
# falls within the window widened by 50 ms on each side.
def during(ts, lat_us):
    start = ts - lat_us / 1000.0
    return any(start <= b + 50 and ts >= a - 50 for a, b, _ in windows)
near = [l for ts, l in lat if during(ts, l)]
away = sorted(l for ts, l in lat if not during(ts, l))
def pct(v, p):
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")
text = open(os.path.join(t, "fio.json")).read()
fio = json.loads(text[text.index("{"):])
job = fio["jobs"][0]
lines = []
lines.append("# Live snapshot: guest request wait (issue 5)")
lines.append("")
lines.append("Generated by `perf/live_snapshot_bench.sh` on %s (%d CPUs)." % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count()))
lines.append("")
lines.append("Image: qcow2, 8 GiB, 64 KiB clusters, preallocation=metadata (every cluster mapped: "
             "131072 data clusters, 16 L2 tables). Load: fio randwrite 4 KiB, iodepth 32, through "
             "`kvblk serve` (vhost-user engine). %d snapshots via the control socket." % snaps)
lines.append("")
lines.append("| snapshot | control round trip (ms) | requests overlapping | their max wait (ms) | reply |")
lines.append("|---|---|---|---|---|")
for i, (a, b, r) in enumerate(windows):
    mine = [l for ts, l in lat if ts - l / 1000.0 <= b + 50 and ts >= a - 50]
    lines.append("| bench%d | %.1f | %d | %.1f | %s |" % (i, b - a, len(mine), max(mine) / 1000.0 if mine else float("nan"), r))
lines.append("| idle (after fio stopped) | %s | | | |" % idle_ms)
lines.append("")
lines.append("| requests | count | p50 (us) | p99 (us) | max (us) |")
lines.append("|---|---|---|---|---|")
sn = sorted(near)
lines.append("| away from snapshots (baseline) | %d | %.0f | %.0f | %.0f |" % (len(away), pct(away, .5), pct(away, .99), away[-1] if away else float("nan")))
lines.append("| overlapping a snapshot | %d | %.0f | %.0f | %.0f |" % (len(sn), pct(sn, .5), pct(sn, .99), sn[-1] if sn else float("nan")))
lines.append("")
lines.append("Phases (s): " + open(os.path.join(t, "phases.txt")).read().strip().replace("\n", ", ") + ".")
lines.append("")
lines.append("fio exit %d, errors %d, %.0f write IOPS overall; `qemu-img check` exit %d."
             % (fio_rc, job["error"], job["write"]["iops"], check_rc))
lines.append("")
lines.append("Requests are held back only during the snapshot's exclusive section: in-flight "
             "requests drain, then, in memory, the L1 is copied, every reachable cluster gets "
             "one more reference and COPIED is cleared. The flush before it, the loading of "
             "tables and refcount blocks, and the writes and syncs after it run while "
             "requests continue (they make the control round trip longer than the wait).")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
