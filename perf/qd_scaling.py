#!/usr/bin/env python3
"""Turns the fio JSON of perf/qd_scaling.sh into a Markdown table (stdout)."""
import argparse
import datetime
import json
import os
import subprocess


def load(path):
    with open(path) as f:
        text = f.read()
    return json.loads(text[text.index("{"):])  # fio may print notes first


def metrics(path, side):
    """(IOPS, p99 completion latency in µs) of the one job in a fio JSON file."""
    job = load(path)["jobs"][0][side]
    pct = job["clat_ns"].get("percentile") or {}
    p99 = pct.get("99.000000")
    return job["iops"], (None if p99 is None else p99 / 1000.0)


def allocated_share(check_path, writes):
    """Fraction of the writes that allocated a cluster (qemu-img check)."""
    try:
        with open(check_path) as f:
            clusters = json.load(f)["allocated-clusters"]
    except (OSError, ValueError, KeyError):
        return None
    return clusters / writes if writes else None


def capture(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--depths", required=True)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--tests", default="read write")
    ap.add_argument("--iothreads", type=int, default=1)
    ap.add_argument("--load", default=None, help="load averages before / after the run")
    args = ap.parse_args()
    tests = args.tests.split()
    depths = [int(d) for d in args.depths.split()]

    print("# Queue-depth scaling, %s" % ("one I/O thread" if args.iothreads == 1 else
                                          "%d I/O threads" % args.iothreads))
    print()
    print("%s, kvblk %s, %s, %s CPUs, %s s per point. Produced by `make bench-qd` "
          "(perf/qd_scaling.sh)." % (
              datetime.date.today().isoformat(),
              capture(["git", "describe", "--always", "--dirty"]),
              capture(["fio", "--version"]), os.cpu_count(), args.runtime))
    if args.load:
        print()
        print("Load average (1, 5, 15 min) before / after: %s." % args.load)
    print()
    print("kvblk: its qcow2 layer in fio (fio-kvblk.so, 64 KiB clusters, cache=none, "
          "L2 cache covering the disk). raw: a raw file with fio's io_uring engine. "
          "Both O_DIRECT, 4 KiB blocks, one fio job; ratio = kvblk / raw. "
          "p99 is the completion latency in µs.%s" %
          ("" if args.iothreads == 1 else
           " kvblk spreads the job's I/Os over %d I/O threads (iothreads=%d); raw uses one."
           % (args.iothreads, args.iothreads)))
    for rw, side, title in (("randread", "read", "4 KiB random reads, fully allocated 1 GiB image"),
                            ("randwrite", "write",
                             "4 KiB random allocating writes, empty 64 GiB image "
                             "(64 KiB-aligned offsets)")):
        if side not in tests:
            continue
        print()
        print("## " + title)
        print()
        head = "| depth | kvblk IOPS | raw IOPS | ratio | kvblk p99 µs | raw p99 µs |"
        if rw == "randwrite":
            head += " writes that allocated |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for d in depths:
            kv = os.path.join(args.json, "%s-kvblk-qd%d.json" % (rw, d))
            raw = os.path.join(args.json, "%s-raw-qd%d.json" % (rw, d))
            try:
                k_iops, k_p99 = metrics(kv, side)
                r_iops, r_p99 = metrics(raw, side)
            except (OSError, ValueError, KeyError, IndexError) as e:
                print("| %d | failed: %s |" % (d, e))
                continue
            ratio = k_iops / r_iops if r_iops else 0.0
            fmt = lambda v: "-" if v is None else "%.0f" % v
            row = "| %d | %.0f | %.0f | %.2f | %s | %s |" % (d, k_iops, r_iops, ratio,
                                                             fmt(k_p99), fmt(r_p99))
            if rw == "randwrite":
                writes = load(kv)["jobs"][0]["write"]["total_ios"]
                share = allocated_share(kv.replace(".json", ".check"), writes)
                row += " %s |" % ("-" if share is None else "%.0f%%" % (100 * share))
            print(row)


if __name__ == "__main__":
    main()
