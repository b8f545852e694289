"""The reporting half of the benchmark (perf/bench.py measures): latest.md
and the PNG chart from a run's results, and the size units and layout names
both halves use.

bench.py passes in the job and ablation order, so nothing here imports it.
"""

import shutil
import subprocess

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def human_size(n):
    for unit, div in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n % div == 0 and n >= div:
            return "%d%s" % (n // div, unit)
    return str(n)


def layout_name(cluster, ext):
    """"64k", "2M", "64k-ext": a cluster size and L2 entry format."""
    return human_size(cluster) + ("-ext" if ext else "")


def fmt_num(v, digits=0):
    if v is None:
        return "–"
    return ("%%.%df" % digits) % v


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def layout_of(r):
    """A matrix result's (cluster, extended_l2); cluster None for raw."""
    return (r["cluster"], bool(r.get("extended_l2")))


def layout_label(k):
    """The cluster column of a table key (group, cluster, ext)."""
    return layout_name(k[1], k[2]) if k[1] else "–"


def median_run(runs):
    """Of a measurement's rounds, the run with the median IOPS (the lower
    middle one for an even count), so every figure of a row comes from one
    real run; with "rounds" and the IOPS range of all of them added."""
    if len(runs) == 1:
        return runs[0]
    ok = sorted((r for r in runs if r.get("iops") is not None), key=lambda r: r["iops"])
    if not ok:
        return runs[0]
    r = dict(ok[(len(ok) - 1) // 2])
    r["rounds"] = len(runs)
    r["iops_min"], r["iops_max"] = ok[0]["iops"], ok[-1]["iops"]
    return r


def runs_by_key(results):
    """{(group, cluster, ext): {backend: [result, ...]}} of the matrix (not
    the ablation): every round of each measurement. A raw run goes to the
    layout it was measured beside (pair_cluster); in results from before
    raw ran per layout, to every layout of its group."""
    table = {}
    layouts = {}
    results = [r for r in results if not r.get("ablation")]
    for r in results:
        if r["cluster"] is not None:
            layouts.setdefault(r["group"], set()).add(layout_of(r))
    for r in results:
        if r["cluster"] is not None:
            ls = [layout_of(r)]
        elif r.get("pair_cluster") is not None:
            ls = [(r["pair_cluster"], bool(r.get("pair_extended_l2")))]
        else:
            ls = sorted(layouts.get(r["group"], [(0, False)]))
        for c, ext in ls:
            table.setdefault((r["group"], c, ext), {}).setdefault(r["backend"], []).append(r)
    return table


def rows_by_key(results):
    """runs_by_key(), each measurement made in several rounds represented by
    median_run()."""
    return {k: {be: median_run(runs) for be, runs in by.items()}
            for k, by in runs_by_key(results).items()}


# The pairs whose IOPS ratio the targets judge, for paired_markdown().
# kvblk/raw splits into kvblk/kvblk-raw (what qcow2 costs inside kvblk) times
# kvblk-raw/raw (kvblk's I/O path against fio's engine, both on the raw file).
PAIRS = [("kvblk", "raw"), ("kvblk", "kvblk-raw"), ("kvblk-raw", "raw"), ("serve", "qemu"),
         ("kvblk", "qemu")]


def paired_markdown(results, job_order):
    """For jobs run in rounds: per pair of backends, the IOPS ratio within
    each round (the two ran minutes apart at most) and the median of those,
    which drift between rounds does not move as it moves the ratio of the
    median runs. Empty when no job ran in rounds."""
    by = {}  # (group, cluster, ext) -> {round: {backend: iops}}
    for k, backends in runs_by_key(results).items():
        for be, runs in backends.items():
            for r in runs:
                if r.get("round") and r.get("iops") is not None:
                    by.setdefault(k, {}).setdefault(r["round"], {})[be] = r["iops"]
    rows = []
    for k in sorted_keys(by, job_order):
        for a, b in PAIRS:
            rs = sorted(v[a] / v[b] for v in by[k].values() if v.get(a) and v.get(b))
            if not rs:
                continue
            n = len(rs)
            med = rs[n // 2] if n % 2 else (rs[n // 2 - 1] + rs[n // 2]) / 2
            rows.append("| %s | %s | %s/%s | %.2f | %s | %d |" % (
                k[0], layout_label(k), a, b, med,
                " ".join("%.2f" % x for x in rs), n))
    if not rows:
        return []
    out = ["## Ratios within rounds", "",
           "The same IOPS ratios taken within each round and their median: the machine's "
           "speed drifts between rounds, which moves the ratio of the median runs above but "
           "not these.", "",
           "| job | cluster | ratio | median | rounds, sorted | n |", "|---|---|---|---|---|---|"]
    return out + rows + [""]


def sorted_keys(table, job_order):
    """The keys of rows_by_key() in job_order (other jobs last), then by
    group, entry format and cluster size."""
    return sorted(table, key=lambda k: (job_order.index(k[0].split("/")[0])
                                        if k[0].split("/")[0] in job_order else 99,
                                        k[0], k[2], k[1]))


def ablation_markdown(results, ablation_order):
    """The L2-cache ablation table (empty list when it did not run), its rows
    in ablation_order (setting names)."""
    rows = [r for r in results if r.get("ablation")]
    if not rows:
        return []
    by = {}
    for r in rows:
        by.setdefault(r["ablation"], []).append(r)
    order = [n for n in ablation_order if n in by]

    def total(name, field):
        return sum(r.get(field) or 0 for r in by[name])

    def tables_desc(name):
        if name == "cover":
            t = max(r.get("l2_tables") or 0 for r in by[name])
            return "covering (%d tables for the 64 GiB images)" % t
        t = min(r.get("l2_tables") or 0 for r in by[name])
        return "%d tables%s" % (t, " (kvblk's minimum)" if name == "min" else "")

    def bw(name, prefix, field):
        for r in by[name]:
            if r["group"].startswith(prefix):
                return (r.get(field) or 0) / MiB
        return None

    base = "cover" if "cover" in by else order[-1]
    out = ["## L2-cache ablation (same run)", ""]
    out.append(
        "The mixed job (four groups at once, each on its own image) through kvblk's disk layer "
        "in fio, 64 KiB clusters, with the same L2 cache size for every group. kvblk has no "
        "uncached mode: its L2 cache keeps at least two tables (`TableCache`), and "
        "`l2_cache_size=0` means a covering cache, so the smallest cache measured is 2 tables "
        "(128 KiB, reaching 1 GiB of guest disk), not \"no cache\". The two random groups use "
        "64 GiB images with preallocated metadata (128 L2 tables; 32 tables reach a quarter "
        "of the disk; reads of never-written clusters hit holes in the host file, so an L2 "
        "miss weighs more than on a filled disk); the sequential and fsync groups use the "
        "mixed job's 256 MiB images, which one table covers, so the cache does not matter to "
        "them directly, but they share the CPU with the random groups. Read and write "
        "MiB/s are summed over the four groups; the 4k columns are the random groups alone.")
    out.append("")
    head = ["L2 cache per image", "read MiB/s", "write MiB/s", "read vs covering",
            "write vs covering", "4k random read MiB/s", "4k read vs covering",
            "seq-128k read MiB/s", "fsync-4k write MiB/s", "errors"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))

    def rand_read(name):
        return (bw(name, "mixed/randread", "read_bw_bytes") or 0) + \
            (bw(name, "mixed/randrw", "read_bw_bytes") or 0)

    for name in order:
        rd, wr = total(name, "read_bw_bytes"), total(name, "write_bw_bytes")
        errs = sum(1 for r in by[name] if r.get("error") or r.get("fio_exit"))
        out.append("| " + " | ".join([
            tables_desc(name), fmt_num(rd / MiB, 1), fmt_num(wr / MiB, 1),
            fmt_num(ratio(rd, total(base, "read_bw_bytes")), 2),
            fmt_num(ratio(wr, total(base, "write_bw_bytes")), 2),
            fmt_num(rand_read(name), 1), fmt_num(ratio(rand_read(name), rand_read(base)), 2),
            fmt_num(bw(name, "mixed/seq", "read_bw_bytes"), 1),
            fmt_num(bw(name, "mixed/fsync", "write_bw_bytes"), 1),
            str(errs)]) + " |")
    out.append("")
    return out


def markdown(meta, results, job_order, ablation_order):
    """latest.md: the ratios and measurements tables, then the ablation's;
    rows in job_order (job names), ablation rows in ablation_order."""
    out = []
    out.append("# kvblk benchmark: %s%s" % (meta["date"], " (quick)" if meta["quick"] else ""))
    out.append("")
    out.append("Host: %s, %d CPUs, kernel %s. %s; %s; kvblk %s. %d s per job, O_DIRECT, "
               "io_uring everywhere. Regenerate with `%s`; see docs/bench.md." %
               (meta["host"], meta["cpus"], meta["kernel"], meta["fio"], meta["qemu"],
                meta["kvblk_rev"], meta["runtime"],
                "make bench-quick" if meta["quick"] else "make bench"))
    out.append("")
    backends = meta["backends"]
    has_serve = "serve" in backends
    has_kvblk_raw = "kvblk-raw" in backends
    table = rows_by_key(results)
    keys = sorted_keys(table, job_order)
    ext = meta.get("extended_l2")
    if ext is not None:
        out.append("Extended L2 entries (`-ext` rows, images made with `qemu-img create -o "
                   "extended_l2=on`): %s." %
                   ("measured" if ext == "yes" else "not measured, " + ext))
        out.append("")
    out.append("## Ratios (same run)")
    out.append("")
    rounded = sorted({r["job"] for r in results if r.get("round")})
    if rounded:
        out.append("Jobs run in rounds, the backends in alternating order: %s. Each figure is "
                   "from the run with the median IOPS; the measurements table gives the IOPS "
                   "range of the rounds." % ", ".join("`%s`" % j for j in rounded))
        out.append("")
    pin = meta.get("pinned")
    if pin is not None:
        out.append("The raw, kvblk-raw and kvblk runs of jobs of one group ran with fio pinned "
                   "to CPU %d "
                   "(as `perf/engine_ab.sh` runs them); the vhost-user runs, the mixed job and "
                   "the ablation ran unpinned, so the kvblk/QEMU columns compare a pinned run "
                   "with an unpinned one." % pin)
        out.append("")
    out.append("`-cpu` jobs read preallocated but unwritten extents (`preallocation=falloc`): "
               "the kernel returns zeros without touching the device, so they compare the "
               "CPU cost of each stack; the other jobs read data on the device.")
    out.append("")
    out.append("IOPS ratios: higher is better for kvblk. p99 and CPU ratios: lower is better. "
               "`kvblk` is the disk layer inside fio (no virtio)%s; `QEMU` is "
               "qemu-storage-daemon behind vhost-user-blk%s." %
               ((", and `kvblk-raw` the same engine on the raw file (format=raw): "
                 "kvblk/raw = kvblk/kvblk-raw (what qcow2 costs inside kvblk) × "
                 "kvblk-raw/raw (kvblk's I/O path against fio's own engine)"
                 if has_kvblk_raw else ""),
                "; `serve` is kvblk serve behind the same vhost-user-blk front end"
                if has_serve else
                ", so kvblk/QEMU compares the disk layer alone with QEMU's whole stack "
                "(kvblk serve was not available)"))
    out.append("")
    head = ["job", "cluster", "IOPS kvblk/raw", "IOPS kvblk/QEMU", "p99 kvblk/raw",
            "p99 kvblk/QEMU", "CPU/IO kvblk/raw"]
    if has_kvblk_raw:
        head += ["IOPS kvblk/kvblk-raw", "IOPS kvblk-raw/raw"]
    if has_serve:
        head += ["IOPS serve/QEMU", "p99 serve/QEMU", "CPU/IO serve/QEMU", "RSS serve/QEMU"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for k in keys:
        b = table[k]
        raw, kv, qe, sv, kr = (b.get(x) for x in ("raw", "kvblk", "qemu", "serve", "kvblk-raw"))
        g = lambda r, f: None if r is None else r.get(f)
        row = [k[0], layout_label(k),
               fmt_num(ratio(g(kv, "iops"), g(raw, "iops")), 2),
               fmt_num(ratio(g(kv, "iops"), g(qe, "iops")), 2),
               fmt_num(ratio(g(kv, "clat_p99_us"), g(raw, "clat_p99_us")), 2),
               fmt_num(ratio(g(kv, "clat_p99_us"), g(qe, "clat_p99_us")), 2),
               fmt_num(ratio(g(kv, "cpu_per_kio"), g(raw, "cpu_per_kio")), 2)]
        if has_kvblk_raw:
            row += [fmt_num(ratio(g(kv, "iops"), g(kr, "iops")), 2),
                    fmt_num(ratio(g(kr, "iops"), g(raw, "iops")), 2)]
        if has_serve:
            row += [fmt_num(ratio(g(sv, "iops"), g(qe, "iops")), 2),
                    fmt_num(ratio(g(sv, "clat_p99_us"), g(qe, "clat_p99_us")), 2),
                    fmt_num(ratio(g(sv, "cpu_per_kio"), g(qe, "cpu_per_kio")), 2),
                    fmt_num(ratio(g(sv, "peak_rss_kib"), g(qe, "peak_rss_kib")), 2)]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out += paired_markdown(results, job_order)
    out.append("## Measurements")
    out.append("")
    out.append("CPU: seconds of CPU per 1000 I/Os — of the back-end process for QEMU and serve, "
               "of the fio job (fio + engine) for raw, kvblk-raw and kvblk. Peak RSS: the back end's "
               "VmHWM, or fio's peak RSS for the in-process engines.")
    out.append("")
    head = ["job", "cluster", "backend", "IOPS", "MiB/s", "p50 µs", "p99 µs",
            "CPU s/1000 IO", "peak RSS MiB", "errors"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for k in keys:
        for be in backends:
            r = table[k].get(be)
            if r is None:
                continue
            iops = fmt_num(r.get("iops"))
            if r.get("rounds"):
                iops += " (%s–%s, %d rounds)" % (fmt_num(r["iops_min"]), fmt_num(r["iops_max"]),
                                                r["rounds"])
            out.append("| " + " | ".join([
                k[0], layout_label(k), be,
                iops,
                fmt_num(None if r.get("bw_bytes") is None else r["bw_bytes"] / MiB, 1),
                fmt_num(r.get("clat_p50_us"), 1), fmt_num(r.get("clat_p99_us"), 1),
                fmt_num(r.get("cpu_per_kio"), 4),
                fmt_num(None if r.get("peak_rss_kib") is None else r["peak_rss_kib"] / 1024.0, 1),
                str(r.get("error", "")) if r.get("error") or r.get("fio_exit") else "0"]) + " |")
    out.append("")
    out += ablation_markdown(results, ablation_order)
    return "\n".join(out)


def chart(meta, results, job_order, dat_path, png_path):
    """Clustered bars: IOPS of each backend relative to raw, per job in
    job_order, drawn by gnuplot into png_path (its data in dat_path)."""
    if not shutil.which("gnuplot"):
        print("note: gnuplot not installed; no chart", flush=True)
        return
    table = rows_by_key(results)
    others = [b for b in meta["backends"] if b != "raw"]
    names = {"kvblk": "kvblk disk layer", "kvblk-raw": "kvblk disk layer, raw file",
             "qemu": "QEMU (vhost-user)",
             "serve": "kvblk serve (vhost-user)"}
    keys = sorted_keys(table, job_order)
    with open(dat_path, "w") as f:
        f.write("# label " + " ".join(others) + "\n")
        for k in keys:
            raw = table[k].get("raw", {}).get("iops")
            vals = [ratio(table[k].get(b, {}).get("iops"), raw) for b in others]
            label = "%s/%s" % (k[0].replace("mixed/", "mix:"), layout_label(k))
            f.write('"%s" %s\n' % (label, " ".join("%.4f" % v if v is not None else "?"
                                                   for v in vals)))
    plots = ", ".join("'%s' using %d:xtic(1) title '%s'" %
                      (dat_path, i + 2, names.get(b, b)) for i, b in enumerate(others))
    script = """
set terminal pngcairo size 1400,700 noenhanced font ',10'
set output '%s'
set title 'IOPS relative to fio io_uring on a raw file (=1.0), %s%s'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set key top right
set grid ytics
set yrange [0:*]
set xtics rotate by -40
set ylabel 'IOPS / raw IOPS'
set datafile missing '?'
plot %s, 1 notitle lt 0
""" % (png_path, meta["date"], " (quick)" if meta["quick"] else "", plots)
    subprocess.run(["gnuplot"], input=script, text=True, check=False)
