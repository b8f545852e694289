#!/usr/bin/env python3
"""Runs kvblk's fio benchmark matrix side by side and writes the results.

Backends, each driven by the same fio job:
  raw    fio's io_uring engine on a raw file (the limit)
  kvblk  kvblk's disk layer in the fio process (build/perf/fio-kvblk.so)
  kvblk-raw  the same engine on the raw file (format=raw), for the read jobs
         the targets judge: kvblk/kvblk-raw is what qcow2 costs inside kvblk,
         kvblk-raw/raw what kvblk's I/O path costs against fio's own engine
  qemu   qemu-storage-daemon serving the same qcow2 image over vhost-user-blk
         (build/perf/fio-vhost-user.so plays the VMM)
  serve  `kvblk serve` over vhost-user-blk, when build/kvblk has `serve`

Every backend uses O_DIRECT (cache=none) and io_uring. Besides the matrix:
an L2-cache ablation (the mixed job through kvblk's disk layer with the
smallest L2 cache kvblk allows, 32 tables, and a covering cache) and, when
the build can open them, images with extended L2 entries (subclusters).
Results go to perf/results/<date>.json, perf/results/latest.md and a PNG
chart. Called by perf/bench.sh, which builds everything first; see
docs/bench.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import GiB, KiB, MiB, chart, human_size, layout_name, markdown  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# {l2_opt} is "--l2-cache-size=N " when `kvblk serve --help` lists that
# option, else empty (serve then uses its default, a cache covering the disk).
DEFAULT_SERVE_CMD = "{kvblk} serve --socket={socket} --cache=none -f qcow2 {l2_opt}{image}"

# Image sizes (virtual). "pre" images are fully preallocated (data on disk);
# "falloc" images are preallocated with fallocate (unwritten extents: reads
# return zeros without touching the device, so a job on them measures the
# software's CPU per I/O, the same on every backend);
# "empty" images are created fresh before every run; "big" is an 8 GiB image
# with preallocated metadata only, read through a small L2 cache.
PRE_SIZE = 1 * GiB
EMPTY_SIZE = 4 * GiB
MIX_SIZE = 256 * MiB
BIG_SIZE = 8 * GiB
# The L2-cache ablation's random groups read and write 64 GiB images with
# preallocated metadata: 128 L2 tables at 64 KiB clusters, so 32 tables
# reach a quarter of the disk (the mixed job's own images fit in 32 tables).
ABL_SIZE = 64 * GiB


def group(name, image, rw, bs, iodepth, **extra):
    g = {"name": name, "image": image, "rw": rw, "bs": bs, "iodepth": iodepth}
    g.update(extra)
    return g


# A job is one fio run: one or more groups (fio job sections) that run at
# the same time, each on its own image.
JOBS = [
    {"name": "randread-4k-qd1", "groups": [group("randread-4k-qd1", "pre", "randread", "4k", 1)]},
    {"name": "randread-4k-qd32", "groups": [group("randread-4k-qd32", "pre", "randread", "4k", 32)]},
    {"name": "randread-4k-qd32-cpu",
     "groups": [group("randread-4k-qd32-cpu", "falloc", "randread", "4k", 32)]},
    {"name": "randwrite-4k-qd1", "groups": [group("randwrite-4k-qd1", "pre", "randwrite", "4k", 1)]},
    {"name": "randwrite-4k-qd32",
     "groups": [group("randwrite-4k-qd32", "pre", "randwrite", "4k", 32)]},
    {"name": "randwrite-4k-qd32-empty",
     "groups": [group("randwrite-4k-qd32-empty", "empty", "randwrite", "4k", 32)]},
    {"name": "seqread-1M-qd8", "groups": [group("seqread-1M-qd8", "pre", "read", "1M", 8)]},
    {"name": "seqwrite-1M-qd8", "groups": [group("seqwrite-1M-qd8", "pre", "write", "1M", 8)]},
    {"name": "mixed", "cluster_sizes": [64 * KiB], "groups": [
        group("mixed/seq-128k-qd4", "mix-seq", "read", "128k", 4),
        group("mixed/randrw-4k-qd8", "mix-rand", "randrw", "4k", 8, rwmixread=70),
        group("mixed/randread-4k-qd8-smallL2", "big", "randread", "4k", 8, small_l2=True),
        group("mixed/fsync-4k-qd1", "mix-sync", "randwrite", "4k", 1, fsync=1),
    ]},
]
QUICK_SKIP = set()  # the quick run has every job, at one cluster size
# Rounds: a job runs `--rounds` times, the backends in alternating order
# (forward, then backward, ...) so that drift in the machine's load falls on
# all of them; reports use the run with the median IOPS. The quick run
# repeats only these jobs: the two the read targets are judged on (a
# single run of the CPU-bound one was seen to swing by a third for serve).
QUICK_ROUND_JOBS = {"randread-4k-qd32", "randread-4k-qd32-cpu"}

BACKENDS = ["raw", "kvblk-raw", "kvblk", "qemu", "serve"]
# Backends that read and write the raw image rather than the qcow2 one (a
# raw-format run is named after, and paired with, the layout it ran beside).
RAW_FORMAT_BACKENDS = {"raw", "kvblk-raw"}
# Backends that run inside the fio process (no back end process of their own).
IN_FIO_BACKENDS = {"raw", "kvblk-raw", "kvblk"}
# kvblk-raw splits the disk layer's read target in two; it runs only there.
KVBLK_RAW_JOBS = {"randread-4k-qd32", "randread-4k-qd32-cpu"}
# The quick run splits only the CPU-bound job: on the device-bound one its
# 4 s rounds swing too much for the split to say anything (0.76-1.30 for
# kvblk/raw in one run), and its three runs took bench-quick to 299 s on a
# fresh clone, at the five minutes it must stay under.
KVBLK_RAW_JOBS_QUICK = {"randread-4k-qd32-cpu"}

# Extended L2 entries (subclusters): the layouts and the jobs they run.
# Full run: both cluster sizes for EXT_JOBS; quick: 64 KiB, EXT_JOBS_QUICK.
EXT_CLUSTERS = [64 * KiB, 2 * MiB]
EXT_JOBS = {"randread-4k-qd32", "randwrite-4k-qd32", "randwrite-4k-qd32-empty",
            "seqwrite-1M-qd8"}
EXT_JOBS_QUICK = {"randwrite-4k-qd32-empty"}

# The L2-cache ablation: the mixed job through kvblk's disk layer, every group
# with the same L2 cache size, in tables of one cluster each. kvblk has no
# uncached mode: its TableCache keeps at least 2 tables, so "min" is 2.
ABLATION_JOB = "l2-ablation"
ABLATION_CLUSTER = 64 * KiB
ABLATION_SETTINGS = [("min", 2), ("32", 32), ("cover", None)]
ABLATION_GROUPS = [
    group("mixed/seq-128k-qd4", "mix-seq", "read", "128k", 4),
    group("mixed/randrw-4k-qd8", "abl-rand", "randrw", "4k", 8, rwmixread=70),
    group("mixed/randread-4k-qd8", "abl-big", "randread", "4k", 8),
    group("mixed/fsync-4k-qd1", "mix-sync", "randwrite", "4k", 1, fsync=1),
]


def log(msg):
    print(msg, flush=True)


def gib(n):
    return "%.1f GiB" % (n / GiB)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def l2_covering(size, cluster, ext=False):
    """L2 cache bytes that cover the whole disk (8 bytes per cluster, 16
    with extended L2 entries)."""
    need = -(-size // cluster) * (16 if ext else 8)
    return max(2 * cluster, -(-need // cluster) * cluster)


def l2_small(cluster):
    """The smallest L2 cache QEMU accepts: two tables."""
    return 2 * cluster


class Images:
    """Creates and caches the benchmark images under `root`."""

    def __init__(self, root):
        self.root = root
        self.trash = os.path.join(os.path.dirname(root), "trash")
        os.makedirs(root, exist_ok=True)
        os.makedirs(self.trash, exist_ok=True)
        self.warmed = {}  # path -> time.monotonic() of its last warm()
        self.fresh = set()  # fresh images made by this run (made anew each time)

    # This machine's virtual disk reads a block it has not read for a while
    # several times slower (the host caches it): an image made or last read
    # long ago starts cold and warms during the rounds, favouring whichever
    # backend reads it later. So every image a job reads data from is read
    # once, whole, before the job (again after WARM_AGAIN_S seconds).
    WARM_AGAIN_S = 600

    def warm(self, path):
        last = self.warmed.get(path)
        if last is not None and time.monotonic() - last < self.WARM_AGAIN_S:
            return
        run(["dd", "if=" + path, "of=/dev/null", "bs=1M", "iflag=direct", "status=none"])
        self.warmed[path] = time.monotonic()

    def _discard(self, path):
        """Moves an image out of the way; empty_trash() deletes it later.
        Deleting a fragmented image takes minutes on a file system mounted
        with `discard` (one synchronous discard per extent), so it must not
        happen between two measurements."""
        os.rename(path, os.path.join(self.trash, "%d.%d.%s" % (
            os.getpid(), time.monotonic_ns(), os.path.basename(path))))

    def discard_fresh(self):
        """Moves this run's fresh images to the trash: the next run makes
        them anew anyway, and together they hold up to 4 GiB per layout."""
        for path in sorted(self.fresh):
            if os.path.exists(path):
                self._discard(path)
        self.fresh.clear()

    def empty_trash(self):
        """Deletes discarded images in the background, at idle I/O priority
        (a detached process: bench.py does not wait for it)."""
        if os.listdir(self.trash):
            subprocess.Popen(["nice", "ionice", "-c3", "sh", "-c",
                              "rm -f \"$0\"/*", self.trash],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)

    def drain_trash(self, why="an earlier run discarded"):
        """Deletes what was discarded, and waits for it: the deletion
        empty_trash() leaves running in the background keeps the kernel busy
        for minutes (discards), which would fall on the measurements."""
        names = os.listdir(self.trash)
        t0 = time.monotonic()
        if names:
            log("deleting %d image(s) %s, before measuring" % (len(names), why))
            for name in names:
                try:
                    os.unlink(os.path.join(self.trash, name))
                except FileNotFoundError:  # the earlier run's rm got there first
                    pass
        os.sync()  # and the journal commits that carry the discards
        if names:
            log("  deleted in %.0f s" % (time.monotonic() - t0))

    # Free space kept beyond what an image may need, for logs and results.
    SPACE_RESERVE = 1 * GiB
    # What a job may write into a sparse image (big, abl-*) beyond what its
    # creation allocates: a 20 s job writes a few GiB at most.
    SPARSE_GROWTH = 4 * GiB

    def free_space(self):
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @classmethod
    def space_needed(cls, size, prealloc, fresh):
        """Bytes an image of `size` may come to occupy: a fresh (empty) or
        preallocated one its whole size, plus metadata (a 2 MiB-cluster qcow2
        filled by 4 KiB writes takes about 0.3 % more); a sparse one what a
        job writes into it."""
        if fresh or prealloc in ("full", "falloc"):
            return size + size // 64
        return min(size, cls.SPARSE_GROWTH)

    def ensure_space(self, need, path):
        """Makes sure `need` bytes and the reserve are free before `path` is
        created. A run discards a fresh image for every backend and layout
        of each allocation job, up to 4.3 GiB each, some 70 GiB in a full
        run: when space runs short the trash is deleted first, and waited
        for, between two measurements. Exits with what is missing when that
        is not enough."""
        if self.free_space() >= need + self.SPACE_RESERVE:
            return
        self.drain_trash("discarded earlier in this run, to make room")
        free = self.free_space()
        if free < need + self.SPACE_RESERVE:
            sys.exit("bench: %s may take %s and %s more are kept free, but %s has only %s "
                     "free: make room there, or run fewer jobs (--jobs, --extended-l2 off)" %
                     (os.path.basename(path), gib(need), gib(self.SPACE_RESERVE),
                      self.root, gib(free)))

    def _create(self, path, fmt, size, cluster=None, prealloc="off", fresh=False, ext=False):
        spec = {"fmt": fmt, "size": size, "cluster": cluster, "prealloc": prealloc}
        if ext:
            spec["extended_l2"] = True
        stamp = path + ".spec"
        if not fresh and os.path.exists(path) and os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f) == spec:
                    return path
        if os.path.exists(stamp):
            os.unlink(stamp)
        if os.path.exists(path):
            self._discard(path)
        self.ensure_space(self.space_needed(size, prealloc, fresh), path)
        opts = []
        if fmt == "qcow2":
            opts.append("cluster_size=%d" % cluster)
            if ext:
                opts.append("extended_l2=on")
        if prealloc != "off":
            opts.append("preallocation=" + prealloc)
        cmd = ["qemu-img", "create", "-q", "-f", fmt]
        if opts:
            cmd += ["-o", ",".join(opts)]
        run(cmd + [path, str(size)])
        self.warmed.pop(path, None)
        if fresh:
            self.fresh.add(path)
        else:
            with open(stamp, "w") as f:
                json.dump(spec, f)
        return path

    def path(self, kind, fmt, cluster, ext=False):
        """The image of `kind` (pre, empty, mix-*, big, abl-*) for a backend
        format; `ext`: qcow2 with extended L2 entries."""
        ext = ext and fmt == "qcow2"
        cs = layout_name(cluster, ext) if fmt == "qcow2" else "raw"
        suffix = "qcow2" if fmt == "qcow2" else "img"
        name = os.path.join(self.root, "%s-%s.%s" % (kind, cs, suffix))
        size = Images.size(kind)
        if kind == "pre" or kind.startswith("mix-"):
            return self._create(name, fmt, size, cluster, "full", ext=ext)
        if kind == "falloc":
            return self._create(name, fmt, size, cluster, "falloc", ext=ext)
        if kind == "big" or kind.startswith("abl-"):
            return self._create(name, fmt, size, cluster,
                                "metadata" if fmt == "qcow2" else "off", ext=ext)
        if kind == "empty":
            return self._create(name, fmt, size, cluster, "off", fresh=True, ext=ext)
        raise ValueError(kind)

    @staticmethod
    def size(kind):
        if kind.startswith("abl-"):
            return ABL_SIZE
        return {"pre": PRE_SIZE, "falloc": PRE_SIZE, "empty": EMPTY_SIZE, "big": BIG_SIZE}.get(
            kind, MIX_SIZE)


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Server:
    """A vhost-user-blk back end process serving one image on one socket."""

    def __init__(self, argv, socket_path, log_path):
        self.socket = socket_path
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 15
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                with open(log_path) as f:
                    raise RuntimeError("back end did not start: %s\n%s" %
                                       (" ".join(argv), f.read()[-2000:]))
            time.sleep(0.02)

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def hwm_kib(self):
        return proc_hwm_kib(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if os.path.exists(self.socket):
            os.unlink(self.socket)


def qsd_argv(image, socket_path, l2):
    return ["qemu-storage-daemon",
            "--blockdev", "driver=file,node-name=f,filename=%s,aio=io_uring,"
                          "cache.direct=on" % image,
            "--blockdev", "driver=qcow2,node-name=q,file=f,cache.direct=on,"
                          "l2-cache-size=%d" % l2,
            "--export", "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,"
                        "addr.path=%s,writable=on,num-queues=1" % socket_path]


def serve_argv(template, kvblk, image, socket_path, l2, l2_supported):
    l2_opt = "--l2-cache-size=%d " % l2 if l2_supported else ""
    return shlex.split(template.format(kvblk=kvblk, image=image, socket=socket_path, l2=l2,
                                       l2_opt=l2_opt))


def pin_plan(wanted):
    """The CPU that fio runs on for the in-process backends (raw, kvblk-raw, kvblk)
    in jobs of one group: the last one this process may use, as
    perf/engine_ab.sh pins it; None if not wanted or with one CPU.
    Pinned, the two compare one thread on one CPU, which the scheduler does
    not move between rounds. The vhost-user runs stay unpinned: pinning the
    back end away from fio's CPU cut serve's device-bound reads from 87k-89k
    to 50k-60k IOPS here, where every interrupt of the disk lands on fio's
    CPU: that measures the machine's interrupt layout more than kvblk; and the
    jobs of several groups stay unpinned, as their threads would share a
    CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if not wanted or len(cpus) < 2:
        return None
    return cpus[-1]


def fio_job_file(path, backend, groups, runtime, engine_paths, time_based, fio_cpu=None):
    lines = ["[global]", "thread=1", "direct=1", "norandommap=1", "randrepeat=1",
             "runtime=%d" % runtime, "time_based=%d" % (1 if time_based else 0)]
    if fio_cpu is not None:
        lines.append("cpus_allowed=%d" % fio_cpu)
    for g in groups:
        lines.append("")
        lines.append("[%s]" % g["name"])
        if backend == "raw":
            lines.append("ioengine=io_uring")
        elif backend in ("kvblk", "kvblk-raw"):
            lines.append("ioengine=external:%s" % engine_paths["kvblk"])
            lines.append("cache=none")
            if backend == "kvblk":
                lines.append("format=qcow2")
                lines.append("l2_cache_size=%d" % g["l2"])
            else:
                lines.append("format=raw")
        else:
            lines.append("ioengine=external:%s" % engine_paths["vhost"])
        lines.append("filename=%s" % g["target"])
        lines.append("rw=%s" % g["rw"])
        lines.append("bs=%s" % g["bs"])
        lines.append("iodepth=%d" % g["iodepth"])
        if "rwmixread" in g:
            lines.append("rwmixread=%d" % g["rwmixread"])
        if g.get("fsync"):
            lines.append("fsync=%d" % g["fsync"])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def percentile_us(clat, p):
    pct = clat.get("percentile") or {}
    v = pct.get("%.6f" % p)
    return None if v is None else v / 1000.0


def group_metrics(j):
    """IOPS, bandwidth, latency and CPU of one fio job section."""
    r, w, t = j["read"], j["write"], j["trim"]
    ios = r["total_ios"] + w["total_ios"] + t["total_ios"]
    main = r if r["total_ios"] >= w["total_ios"] else w
    return {
        "iops": r["iops"] + w["iops"] + t["iops"],
        "bw_bytes": r["bw_bytes"] + w["bw_bytes"] + t["bw_bytes"],
        "read_bw_bytes": r["bw_bytes"],
        "write_bw_bytes": w["bw_bytes"],
        "clat_p50_us": percentile_us(main["clat_ns"], 50),
        "clat_p99_us": percentile_us(main["clat_ns"], 99),
        "total_ios": ios,
        "fio_cpu_s": (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0,
        "error": j["error"],
    }


def layout_fields(backend, cluster, ext):
    """A result's layout: its cluster size and extended L2 (none for raw),
    and for a raw run the layout whose runs it was measured beside, the one
    bench_report pairs it with."""
    raw = backend in RAW_FORMAT_BACKENDS
    return {"cluster": None if raw else cluster, "extended_l2": not raw and ext,
            "pair_cluster": cluster if raw else None, "pair_extended_l2": raw and ext}


class Bench:
    def __init__(self, args):
        self.args = args
        self.build = os.path.abspath(args.build)
        self.work = os.path.join(self.build, "perf", "bench")
        self.images = Images(os.path.join(self.work, "images"))
        self.runs_dir = os.path.join(self.work, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)
        self.engines = {"kvblk": os.path.join(self.build, "perf", "fio-kvblk.so"),
                        "vhost": os.path.join(self.build, "perf", "fio-vhost-user.so")}
        self.kvblk = os.path.join(self.build, "kvblk")
        self.serve_cmd = args.serve_cmd or os.environ.get("KVBLK_SERVE_CMD") or DEFAULT_SERVE_CMD
        self.backends = args.backends.split(",")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise SystemExit("bench: unknown backend(s) %s (known: %s)" %
                             (", ".join(unknown), ", ".join(BACKENDS)))
        self.serve_l2 = False
        if "serve" in self.backends and not self.has_serve():
            log("note: %s has no 'serve' command; skipping the serve backend" % self.kvblk)
            self.backends.remove("serve")
        self.results = []
        self.pin = pin_plan(args.pin)
        self.ext_l2 = (self.ext_l2_support() if args.extended_l2 != "off"
                       else "turned off (--extended-l2 off)")
        if self.ext_l2 != "yes" and args.extended_l2 != "off":
            log("note: skipping the extended-L2 images: %s" % self.ext_l2)

    def ext_l2_support(self):
        """"yes" if build/kvblk can write and read back an image with
        extended L2 entries, else why not (the fio engine and serve link the
        same disk layer)."""
        if not os.access(self.kvblk, os.X_OK):
            return "no %s to ask" % self.kvblk
        path = os.path.join(self.work, "ext-l2-probe.qcow2")
        try:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "cluster_size=64k,extended_l2=on", path, "16M"])
            r = subprocess.run([self.kvblk, "io", "-c", "write -q -P 165 4k 4k",
                                "-c", "read -q -P 165 4k 4k", "-c", "read -q -P 0 0 4k", path],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        finally:
            if os.path.exists(path):
                os.unlink(path)
        if r.returncode == 0:
            return "yes"
        return "this build cannot use them (%s)" % (r.stdout.strip().splitlines() or ["?"])[-1]

    def has_serve(self):
        self.serve_l2 = False
        if not os.access(self.kvblk, os.X_OK):
            return False
        r = subprocess.run([self.kvblk, "serve", "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        self.serve_l2 = "--l2-cache-size" in r.stdout
        return r.returncode == 0

    def layouts(self, job):
        """(cluster, extended_l2) pairs the job runs at."""
        if "cluster_sizes" in job:
            out = [(c, False) for c in job["cluster_sizes"]]
        else:
            out = [(c, False) for c in ([64 * KiB] if self.args.quick else [64 * KiB, 2 * MiB])]
        if self.args.extended_l2 == "off" or self.ext_l2 != "yes":
            return out
        if job["name"] in (EXT_JOBS_QUICK if self.args.quick else EXT_JOBS):
            out += [(c, True) for c in ([64 * KiB] if self.args.quick else EXT_CLUSTERS)]
        if self.args.extended_l2 == "only":
            out = [lo for lo in out if lo[1]]
        return out

    def run_job(self, job, backend, cluster, ext=False, l2_tables=None, ablation=None,
                round_no=0):
        """One fio run of `job` on `backend`. l2_tables: every group's L2
        cache in tables (0 = covering) instead of the job's own sizes."""
        # (A raw run is named after the layout it is measured beside.)
        tag = "%s.%s.%s" % (job["name"], backend, layout_name(cluster, ext))
        if ablation:
            tag += "." + ablation
        if round_no:
            tag += ".r%d" % round_no
        fmt = "raw" if backend in RAW_FORMAT_BACKENDS else "qcow2"
        groups = []
        for g in job["groups"]:
            g = dict(g)
            g["image_path"] = self.images.path(g["image"], fmt, cluster, ext)
            if g["image"] == "pre" or g["image"].startswith("mix-"):
                self.images.warm(g["image_path"])
            size = Images.size(g["image"])
            if l2_tables is not None:
                g["l2"] = (l2_covering(size, cluster, ext) if l2_tables == 0
                           else l2_tables * cluster)
            else:
                g["l2"] = (l2_small(cluster) if g.get("small_l2")
                           else l2_covering(size, cluster, ext))
            groups.append(g)
        time_based = all(g["image"] != "empty" for g in groups)
        in_fio = backend in IN_FIO_BACKENDS
        pin = self.pin if len(groups) == 1 and in_fio else None
        servers = []
        try:
            for i, g in enumerate(groups):
                if in_fio:
                    g["target"] = g["image_path"]
                    continue
                sock = os.path.join(self.work, "%s.%d.sock" % (backend, i))
                if backend == "qemu":
                    argv = qsd_argv(g["image_path"], sock, g["l2"])
                else:
                    argv = serve_argv(self.serve_cmd, self.kvblk, g["image_path"], sock, g["l2"],
                                      self.serve_l2)
                servers.append(Server(argv, sock, os.path.join(self.runs_dir, tag + ".%d.log" % i)))
                g["target"] = sock
            jobfile = os.path.join(self.runs_dir, tag + ".fio")
            out = os.path.join(self.runs_dir, tag + ".json")
            rss = os.path.join(self.runs_dir, tag + ".rss")
            fio_job_file(jobfile, backend, groups, self.args.runtime, self.engines, time_based,
                         pin)
            cpu0 = [s.cpu() for s in servers]
            t0 = time.time()
            p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss, "fio",
                                "--output-format=json", "--output=" + out, jobfile],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            elapsed = time.time() - t0
            cpu1 = [s.cpu() for s in servers]
            hwm = [s.hwm_kib() for s in servers]
        finally:
            for s in servers:
                s.stop()
        if p.returncode != 0:
            log("  FAILED (fio exit %d): %s" % (p.returncode, p.stdout.strip()[-1500:]))
        try:
            with open(out) as f:
                text = f.read()
            data = json.loads(text[text.index("{"):])
        except (OSError, ValueError):
            data = {"jobs": []}
        with open(rss) as f:
            fio_rss = int((f.read().split() or ["0"])[-1] or 0)
        by_name = {j["jobname"]: j for j in data["jobs"]}
        for i, g in enumerate(groups):
            res = {"job": job["name"], "group": g["name"], "backend": backend,
                   **layout_fields(backend, cluster, ext),
                   "rw": g["rw"], "bs": g["bs"], "iodepth": g["iodepth"],
                   "l2_cache": (None if backend in RAW_FORMAT_BACKENDS or
                                (backend == "serve" and not self.serve_l2) else g["l2"]),
                   "elapsed_s": elapsed, "fio_exit": p.returncode, "round": round_no}
            j = by_name.get(g["name"])
            if j is None:
                res["error"] = "no fio result"
                self.results.append(res)
                continue
            res.update(group_metrics(j))
            if servers:
                res["cpu_s"] = cpu1[i] - cpu0[i]
                res["cpu_source"] = "backend process (/proc/PID/stat)"
                res["peak_rss_kib"] = hwm[i]
                res["rss_source"] = "backend VmHWM"
            else:
                res["cpu_s"] = res["fio_cpu_s"]
                res["cpu_source"] = "fio job usr+sys"
                res["peak_rss_kib"] = fio_rss
                res["rss_source"] = "fio process peak RSS"
            res["cpu_per_kio"] = (res["cpu_s"] / (res["total_ios"] / 1000.0)
                                  if res["total_ios"] else None)
            if ablation:
                res["ablation"] = ablation
                res["l2_tables"] = g["l2"] // cluster
            self.results.append(res)
            log("  %-34s %-6s %9.0f IOPS  p99 %8.1f us  %.4f cpu-s/kIO" %
                (g["name"], backend, res["iops"], res["clat_p99_us"] or 0,
                 res["cpu_per_kio"] or 0))

    def rounds(self, job):
        if self.args.quick and job["name"] not in QUICK_ROUND_JOBS:
            return 1
        return self.args.rounds

    def run(self):
        jobs = [j for j in JOBS if re.search(self.args.jobs, j["name"])]
        split = KVBLK_RAW_JOBS_QUICK if self.args.quick else KVBLK_RAW_JOBS
        for job in jobs:
            n = self.rounds(job)
            for rnd in range(n):
                order = self.backends if rnd % 2 == 0 else list(reversed(self.backends))
                # raw runs once per layout, beside that layout's runs, so
                # that a kvblk/raw ratio compares runs made side by side
                # (see docs/bench.md, "Rounds").
                for cluster, ext in self.layouts(job):
                    for backend in order:
                        if backend == "kvblk-raw" and job["name"] not in split:
                            continue
                        log("%s  cluster=%s  backend=%s%s" %
                            (job["name"], layout_name(cluster, ext), backend,
                             "  round %d/%d" % (rnd + 1, n) if n > 1 else ""))
                        self.run_job(job, backend, cluster, ext, round_no=rnd + 1 if n > 1 else 0)
        if (self.args.l2_ablation and "kvblk" in self.backends and
                re.search(self.args.jobs, ABLATION_JOB)):
            job = {"name": ABLATION_JOB, "groups": ABLATION_GROUPS}
            for name, tables in ABLATION_SETTINGS:
                log("%s  cluster=%s  backend=kvblk  L2=%s" %
                    (ABLATION_JOB, human_size(ABLATION_CLUSTER), name))
                self.run_job(job, "kvblk", ABLATION_CLUSTER, l2_tables=tables or 0,
                             ablation=name)


def capture(cmd):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=TOP).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def write_report(meta, results, results_dir, dat_path, png_path):
    """Writes latest.md into results_dir and the chart to png_path, copied to
    latest.png there (bench_report.py); returns the markdown."""
    job_order = [j["name"] for j in JOBS]
    md = markdown(meta, results, job_order, [n for n, _ in ABLATION_SETTINGS])
    with open(os.path.join(results_dir, "latest.md"), "w") as f:
        f.write(md)
    chart(meta, results, job_order, dat_path, png_path)
    if os.path.exists(png_path):
        shutil.copyfile(png_path, os.path.join(results_dir, "latest.png"))
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--quick", action="store_true",
                    help="64 KiB clusters only, short runs (bench-quick)")
    ap.add_argument("--runtime", type=int, default=None,
                    help="seconds per job (default 20; 4 with --quick)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated, from raw, kvblk-raw, kvblk, qemu, serve (default: "
                         "all; kvblk-raw runs only for %s, and with --quick only for %s)" %
                         (", ".join(sorted(KVBLK_RAW_JOBS)),
                          ", ".join(sorted(KVBLK_RAW_JOBS_QUICK))))
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each job, backends in alternating order (default 3; with "
                         "--quick only for %s)" % ", ".join(sorted(QUICK_ROUND_JOBS)))
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="run fio where the scheduler puts it (by default, the raw and "
                         "kvblk runs of jobs of one group pin fio to the last CPU)")
    ap.add_argument("--jobs", default=".", help="regex on job names (the ablation is '%s')"
                    % ABLATION_JOB)
    ap.add_argument("--extended-l2", choices=("auto", "off", "only"), default="auto",
                    help="images with extended L2 entries: auto (when the build opens them), "
                         "off, or only those")
    ap.add_argument("--no-l2-ablation", dest="l2_ablation", action="store_false",
                    help="leave out the L2-cache ablation")
    ap.add_argument("--serve-cmd", default=None,
                    help="kvblk serve command template; {kvblk} {image} {socket} {l2} "
                         "{l2_opt} are replaced (default: $KVBLK_SERVE_CMD or '%s')" % DEFAULT_SERVE_CMD)
    ap.add_argument("--results", default=os.path.join(TOP, "perf", "results"))
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only redo latest.md and the chart from a results file")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            data = json.load(f)
        stem = os.path.splitext(args.report)[0]
        work = os.path.join(os.path.abspath(args.build), "perf", "bench")
        os.makedirs(work, exist_ok=True)
        os.makedirs(args.results, exist_ok=True)
        md = write_report(data["meta"], data["results"], args.results,
                          os.path.join(work, "chart.dat"), stem + ".png")
        print(md)
        return 0
    if args.runtime is None:
        args.runtime = 4 if args.quick else 20

    bench = Bench(args)
    now = datetime.datetime.now()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "runtime": args.runtime,
        "rounds": args.rounds,
        "backends": bench.backends,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "fio": capture(["fio", "--version"]),
        "qemu": capture(["qemu-storage-daemon", "--version"]),
        "kvblk_rev": capture(["git", "describe", "--always", "--dirty"]),
        "extended_l2": bench.ext_l2,
        "pinned": bench.pin,
    }
    log("kvblk bench: backends %s, %d s per job%s" %
        (",".join(bench.backends), args.runtime, ", quick" if args.quick else ""))
    t0 = time.time()
    bench.images.drain_trash()
    try:
        bench.run()
    finally:
        bench.images.discard_fresh()
        bench.images.empty_trash()
    meta["duration_s"] = round(time.time() - t0, 1)

    os.makedirs(args.results, exist_ok=True)
    stem = now.strftime("%Y-%m-%d-%H%M%S") + ("-quick" if args.quick else "")
    json_path = os.path.join(args.results, stem + ".json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": bench.results}, f, indent=1)
    png = os.path.join(args.results, stem + ".png")
    md = write_report(meta, bench.results, args.results, os.path.join(bench.work, "chart.dat"),
                      png)
    log("")
    log(md)
    log("wrote %s, %s/latest.md, %s (%.0f s)" % (json_path, args.results, png,
                                                 meta["duration_s"]))
    failed = [r for r in bench.results if r.get("error") or r.get("fio_exit")]
    if failed:
        log("%d measurement(s) failed; see %s" % (len(failed), bench.runs_dir))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
