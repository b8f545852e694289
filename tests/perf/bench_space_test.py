"""Tests perf/bench.py's image space handling: the images a run discards
(a fresh one per backend and layout of every allocation job) must not fill
the disk, and a disk too full for the next image must stop the run with a
message saying what is missing, before anything is measured on it.

The free space the images' file system reports is simulated (Images.
free_space), so that the test does not need tens of GiB; the images are
real qcow2 files made by qemu-img, sparse and small (the 1 GiB `falloc` image
is preallocated: its blocks are reserved, not written).

Usage: python3 tests/perf/bench_space_test.py TMPDIR. Prints one
"ok - ..." or "not ok - ..." line per check; exits non-zero on a failure.
"""
import contextlib
import io
import os
import sys

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(TOP, "perf"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import checks  # noqa: E402
from checks import verdict  # noqa: E402

GiB = bench.GiB


def quiet(fn, *args):
    """Runs fn(*args) with bench's log lines captured; returns
    (result, log, exit message or None)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            return fn(*args), out.getvalue(), None
        except SystemExit as e:
            return None, out.getvalue(), str(e.code)


def main():
    tmp = sys.argv[1]
    images = bench.Images(os.path.join(tmp, "images"))
    empty_size = bench.Images.size("empty")
    need = bench.Images.space_needed(empty_size, "off", True)
    verdict("a fresh image may need its whole size and a little metadata",
            empty_size < need <= empty_size + empty_size // 32, need)
    verdict("a sparse 64 GiB image is counted by what a job writes into it",
            bench.Images.space_needed(64 * GiB, "metadata", False) == bench.Images.SPARSE_GROWTH)

    # A disk with room for one fresh image and the reserve: each image left
    # in the trash takes 5 GiB of it.
    room = need + bench.Images.SPACE_RESERVE + GiB

    def simulated_free():
        return room - 5 * GiB * len(os.listdir(images.trash))

    images.free_space = simulated_free
    paths, logs, exits = [], [], []
    for _ in range(3):
        p, log, ex = quiet(images.path, "empty", "qcow2", 64 * 1024)
        paths.append(p)
        logs.append(log)
        exits.append(ex)
    verdict("three fresh images in a row on a disk with room for one: all made",
            all(e is None for e in exits) and all(p and os.path.exists(p) for p in paths),
            exits)
    verdict("the image each one replaced was deleted from the trash first",
            os.listdir(images.trash) == [] and
            all("to make room" in log for log in logs[1:]), "".join(logs))
    verdict("the first, with room to spare, deleted nothing",
            "deleting" not in logs[0], logs[0])

    # With plenty of room, discarded images stay in the trash until the end.
    images.free_space = lambda: 100 * GiB
    quiet(images.path, "empty", "qcow2", 64 * 1024)
    verdict("with room to spare, a replaced image waits in the trash",
            len(os.listdir(images.trash)) == 1, os.listdir(images.trash))

    # At the end of a run its fresh images go to the trash too: the next run
    # makes them anew, so keeping them would only hold the disk.
    fresh = os.path.join(images.root, "empty-64k.qcow2")
    kept = os.path.join(images.root, "falloc-64k.qcow2")
    quiet(images.path, "falloc", "qcow2", 64 * 1024)
    images.discard_fresh()
    verdict("at the end of a run its fresh images are discarded, the others kept",
            not os.path.exists(fresh) and os.path.exists(kept) and
            len(os.listdir(images.trash)) == 2, os.listdir(images.trash))
    quiet(images.drain_trash)

    # A disk too full even with the trash emptied: a clear stop, not an
    # image that fills the disk in the middle of a measurement.
    images.free_space = lambda: 2 * GiB
    p, log, ex = quiet(images.path, "empty", "qcow2", 2 * 1024 * 1024)
    verdict("a disk too full for the next image stops the run with what is missing",
            p is None and ex is not None and "empty-2M.qcow2" in ex and
            "only 2.0 GiB free" in ex and "make room" in ex, ex)
    verdict("and the trash was emptied before giving up",
            os.listdir(images.trash) == [], os.listdir(images.trash))
    verdict("and no image was created",
            not os.path.exists(os.path.join(images.root, "empty-2M.qcow2")))
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
