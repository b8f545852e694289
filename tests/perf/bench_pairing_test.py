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



def simulated_bench(rounds):
    """A Bench over the full matrix's layouts whose run_job records each run
    and makes a result as run_job does, with drifting IOPS."""
    b = bench.Bench.__new__(bench.Bench)
    b.args = argparse.Namespace(jobs="^randread-4k-qd32$", quick=False, rounds=rounds,
                                extended_l2="auto", l2_ablation=False)
    b.backends = ["raw", "kvblk", "qemu", "serve"]
    b.ext_l2 = "yes"
    b.results = []
    calls = []

    def run_job(job, backend, cluster, ext=False, l2_tables=None, ablation=None, round_no=0):
        speed = 100000 * 0.98 ** len(calls)  # the device slows down run after run
        calls.append((backend, cluster, ext, round_no))
        iops = {"qemu": speed / 2, "serve": speed}.get(backend, speed)
        for g in job["groups"]:
            b.results.append({"job": job["name"], "group": g["name"], "backend": backend,
                              **bench.layout_fields(backend, cluster, ext),
                              "round": round_no, "iops": iops})

    b.run_job = run_job
    return b, calls


def main():
    b, calls = simulated_bench(rounds=2)
    with open(os.devnull, "w") as null:
        saved, sys.stdout = sys.stdout, null
        try:
            b.run()
        finally:
            sys.stdout = saved
    layouts = [(c, e) for c, e in b.layouts(bench.JOBS[[j["name"] for j in bench.JOBS]
                                                         .index("randread-4k-qd32")])]
    verdict("the full matrix measures randread-4k-qd32 at four layouts", len(layouts) == 4,
            layouts)

    raw_runs = [(c, e, r) for be, c, e, r in calls if be == "raw"]
    want = sorted((c, e, r) for r in (1, 2) for c, e in layouts)
    verdict("raw runs once per layout in every round", sorted(raw_runs) == want,
            "raw runs: %s\nwant: %s" % (raw_runs, want))

    # Each layout's runs in a round are consecutive, raw among them.
    far = []
    for i, (be, c, e, r) in enumerate(calls):
        if be != "kvblk":
            continue
        j = next((j for j, x in enumerate(calls) if x == ("raw", c, e, r)), None)
        if j is None or abs(i - j) > 3:
            far.append((c, e, r, i, j))
    verdict("each kvblk run is at most three runs from its layout's raw run", not far, far)

    table = bench_report.rows_by_key(b.results)
    ratios = {k: v["kvblk"]["iops"] / v["raw"]["iops"] for k, v in table.items()
              if "kvblk" in v and "raw" in v}
    verdict("every layout's kvblk/raw compares runs made side by side (ratio within 6 %)",
            len(ratios) == 4 and all(0.94 <= x <= 1.06 for x in ratios.values()), ratios)

    md = "\n".join(bench_report.paired_markdown(b.results, [j["name"] for j in bench.JOBS]))
    rows = [ln for ln in md.splitlines() if "| kvblk/raw |" in ln]
    meds = [float(ln.split("|")[4]) for ln in rows]
    verdict("'Ratios within rounds' pairs kvblk with the raw run of its own layout",
            len(rows) == 4 and all(0.94 <= m <= 1.06 for m in meds), md)

    # Results written before raw ran per layout (one raw run per job, no
    # pair_cluster) still give every layout its group's raw run.
    old = [dict(r) for r in b.results if r["round"] == 1]
    first_raw = next(r for r in old if r["backend"] == "raw")
    del first_raw["pair_cluster"], first_raw["pair_extended_l2"]
    old = [r for r in old if r["backend"] != "raw" or r is first_raw]
    old_table = bench_report.runs_by_key(old)
    verdict("an older results file's one raw run serves every layout of its group",
            len(old_table) == 4 and all(v.get("raw") == [first_raw] for v in old_table.values()),
            old_table.keys())

    sys.exit(1 if checks.failures else 0)


if __name__ == "__main__":
    main()
