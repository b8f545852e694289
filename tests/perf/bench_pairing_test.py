"""Tests that perf/bench.py compares each layout's runs with a raw run made
beside them: raw runs once per layout (cluster size, extended L2) in every
round, and perf/bench_report.py pairs each raw run with its own layout only.

A full run measures four layouts of some jobs one after the other, minutes
apart, and this machine's device drifts meanwhile; with one raw run per job,
the last layouts' kvblk/raw compared runs made minutes apart.

The fio runs are simulated: Bench.run_job is replaced by one that records
the order of the runs and reports, for every backend, the IOPS of a device
that slows down by 2 % with every run. kvblk then keeps pace with raw, and
its ratio to a raw run made beside it is close to 1; a stale raw run shows
up as a ratio far below 1.

Usage: python3 tests/perf/bench_pairing_test.py. Prints one "ok - ..." or
"not ok - ..." line per check; exits non-zero on a failure.
"""
import argparse
import os
import sys

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(TOP, "perf"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import checks  # noqa: E402
from checks import verdict  # noqa: E402
import bench_report  # noqa: E402



def simulated_bench(rounds, quick=False, jobs="^(randread|randwrite)-4k-qd32$"):
    """A Bench over the full matrix's layouts (the quick one's with `quick`)
    whose run_job records each run and makes a result as run_job does, with
    drifting IOPS."""
    b = bench.Bench.__new__(bench.Bench)
    b.args = argparse.Namespace(jobs=jobs, quick=quick,
                                rounds=rounds, extended_l2="auto", l2_ablation=False)
    b.backends = list(bench.BACKENDS)
    b.ext_l2 = "yes"
    b.results = []
    calls = []

    def run_job(job, backend, cluster, ext=False, l2_tables=None, ablation=None, round_no=0):
        speed = 100000 * 0.98 ** len(calls)  # the device slows down run after run
        calls.append((job["name"], backend, cluster, ext, round_no))
        iops = {"qemu": speed / 2, "serve": speed}.get(backend, speed)
        for g in job["groups"]:
            b.results.append({"job": job["name"], "group": g["name"], "backend": backend,
                              **bench.layout_fields(backend, cluster, ext),
                              "round": round_no, "iops": iops})

    b.run_job = run_job
    return b, calls


def run_quietly(b):
    """Runs the simulated bench `b` with its progress log thrown away."""
    with open(os.devnull, "w") as null:
        saved, sys.stdout = sys.stdout, null
        try:
            b.run()
        finally:
            sys.stdout = saved


def main():
    b, calls = simulated_bench(rounds=2)
    run_quietly(b)
    layouts = [(c, e) for c, e in b.layouts(bench.JOBS[[j["name"] for j in bench.JOBS]
                                                         .index("randread-4k-qd32")])]
    verdict("the full matrix measures randread-4k-qd32 at four layouts", len(layouts) == 4,
            layouts)

    read = "randread-4k-qd32"
    want = sorted((c, e, r) for r in (1, 2) for c, e in layouts)
    for be in ("raw", "kvblk-raw"):
        runs = [(c, e, r) for jb, b_, c, e, r in calls if b_ == be and jb == read]
        verdict("%s runs once per layout in every round" % be, sorted(runs) == want,
                "%s runs: %s\nwant: %s" % (be, runs, want))
    elsewhere = [x for x in calls if x[1] == "kvblk-raw" and x[0] != read]
    verdict("kvblk-raw runs only for the read jobs the targets judge",
            not elsewhere and any(x[0] == "randwrite-4k-qd32" for x in calls), elsewhere)

    # Each layout's runs in a round are consecutive, raw among them.
    far = []
    for i, (jb, be, c, e, r) in enumerate(calls):
        if be not in ("kvblk", "kvblk-raw"):
            continue
        j = next((j for j, x in enumerate(calls) if x == (jb, "raw", c, e, r)), None)
        if j is None or abs(i - j) > 2:
            far.append((jb, be, c, e, r, i, j))
    verdict("each kvblk and kvblk-raw run is at most two runs from its layout's raw run",
            not far, far)

    table = {k: v for k, v in bench_report.rows_by_key(b.results).items() if k[0] == read}
    for a in ("kvblk", "kvblk-raw"):
        ratios = {k: v[a]["iops"] / v["raw"]["iops"] for k, v in table.items()
                  if a in v and "raw" in v}
        verdict("every layout's %s/raw compares runs made side by side (ratio within 6 %%)" % a,
                len(ratios) == 4 and all(0.94 <= x <= 1.06 for x in ratios.values()), ratios)

    md = "\n".join(bench_report.paired_markdown(b.results, [j["name"] for j in bench.JOBS]))
    for pair in ("kvblk/raw", "kvblk/kvblk-raw", "kvblk-raw/raw"):
        rows = [ln for ln in md.splitlines() if ln.startswith("| %s |" % read)
                and "| %s |" % pair in ln]
        meds = [float(ln.split("|")[4]) for ln in rows]
        verdict("'Ratios within rounds' pairs %s runs of the same layout" % pair,
                len(rows) == 4 and all(0.94 <= m <= 1.06 for m in meds), md)

    # The ratios table splits kvblk/raw in two where kvblk-raw ran, and
    # leaves the two columns empty elsewhere.
    meta = {"date": "d", "quick": False, "host": "h", "cpus": 2, "kernel": "k", "fio": "f",
            "qemu": "q", "kvblk_rev": "r", "runtime": 20, "backends": list(bench.BACKENDS)}
    report = bench_report.markdown(meta, b.results, [j["name"] for j in bench.JOBS], [])
    head = next(ln for ln in report.splitlines() if ln.startswith("| job | cluster | IOPS"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    split_ok, bad = True, []
    for ln in report.splitlines():
        if not ln.startswith("| randread-4k-qd32 |") and not ln.startswith("| randwrite-4k-qd32 |"):
            continue
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(cols):
            continue  # the measurements table
        kr, krr = cells[cols.index("IOPS kvblk/kvblk-raw")], cells[cols.index("IOPS kvblk-raw/raw")]
        if cells[0] == read:
            ok = kr != "–" and krr != "–" and 0.94 <= float(kr) <= 1.06
        else:
            ok = kr == "–" and krr == "–"
        if not ok:
            split_ok = False
            bad.append(ln)
    verdict("the ratios table has kvblk/kvblk-raw and kvblk-raw/raw for the read job only",
            split_ok and "IOPS kvblk-raw/raw" in cols, "\n".join(bad) or head)

    # Results written before raw ran per layout (one raw run per job, no
    # pair_cluster) still give every layout its group's raw run.
    old = [dict(r) for r in b.results if r["round"] == 1 and r["job"] == read
           and r["backend"] != "kvblk-raw"]
    first_raw = next(r for r in old if r["backend"] == "raw")
    del first_raw["pair_cluster"], first_raw["pair_extended_l2"]
    old = [r for r in old if r["backend"] != "raw" or r is first_raw]
    old_table = bench_report.runs_by_key(old)
    verdict("an older results file's one raw run serves every layout of its group",
            len(old_table) == 4 and all(v.get("raw") == [first_raw] for v in old_table.values()),
            old_table.keys())

    # bench-quick splits only the CPU-bound read (its time limit).
    q, qcalls = simulated_bench(rounds=3, quick=True, jobs="^randread-4k-qd32(-cpu)?$")
    run_quietly(q)
    split = sorted({x[0] for x in qcalls if x[1] == "kvblk-raw"})
    rounds = sorted(x[4] for x in qcalls if x[1] == "kvblk-raw")
    verdict("bench-quick runs kvblk-raw for the CPU-bound read only, in every round",
            split == ["randread-4k-qd32-cpu"] and rounds == [1, 2, 3] and
            any(x[0] == "randread-4k-qd32" and x[1] == "raw" for x in qcalls),
            "%s %s" % (split, rounds))

    sys.exit(1 if checks.failures else 0)


if __name__ == "__main__":
    main()
