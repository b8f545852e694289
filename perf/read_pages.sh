#!/bin/bash
# Counts the distinct 4 KiB pages (code and data) and 64-byte data lines
# that user space touches per 4k random read between two io_uring_enter
# calls, with fio's io_uring engine on a raw file or a fio engine such as
# build/perf/fio-kvblk.so on a qcow2 image. On a kernel that flushes the TLB
# at every system call (page-table isolation without PCID), each such page
# costs a page walk; see disk/hot.h and docs/disk-layer.md.
#
# Usage: perf/read_pages.sh [-n READS] [-k] ENGINE FILE
#   ENGINE  io_uring, or the path of an external engine (.so)
#   FILE    the image to read (falloc images keep the device out of it)
#   -n      reads traced (default 3000; the first fifth is skipped)
#   -k      keep the trace (build/perf/pages/trace.log, about 1.5 GB)
# Runs fio under valgrind's lackey: expect about 4 minutes.
#
# Prints the medians per read, then the pages per read by mapping ("?":
# memory mapped after the snapshot of /proc/PID/maps, usually the heap).
# For an external engine it then lists, per function of the engine, the
# data lines per read that the function was the first to touch in the read
# and that fio's own code did not touch: where the engine's footprint is;
# then the same for data pages, with the mapping each page lies in.
set -euo pipefail

reads=3000 keep=0
while getopts "n:kh" o; do
  case $o in
    n) reads=$OPTARG ;; k) keep=1 ;; h) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n '9,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
engine=$1 file=$2
case $engine in io_uring) ;; *) engine=external:$(cd "$(dirname "$engine")" && pwd)/$(basename "$engine") ;; esac
for tool in valgrind fio python3; do
  command -v $tool >/dev/null || { echo "read_pages: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done

dir=$(cd "$(dirname "$0")/.." && pwd)/build/perf/pages
mkdir -p "$dir"
log=$dir/trace.log maps=$dir/maps
rm -f "$log" "$maps"
valgrind --tool=lackey --trace-mem=yes --trace-syscalls=yes --log-file="$log" \
  fio --name=pages --rw=randread --bs=4k --iodepth=32 --direct=1 --number_ios="$reads" \
  --size=1G --thread --ioengine="$engine" --filename="$file" --output=/dev/null &
vg=$!
# The mappings, once reads are under way (the heap and rings exist by then).
while kill -0 $vg 2>/dev/null; do
  sleep 1
  if grep -q -m1 '(426)' "$log" 2>/dev/null; then
    sleep 3
    cat /proc/$vg/maps >"$maps" 2>/dev/null || true
    break
  fi
done
wait $vg

so=
case $engine in external:*) so=${engine#external:} ;; esac
python3 - "$log" "$maps" "$so" <<'EOF'
import bisect, collections, statistics, subprocess, sys
log, mapsf, so = sys.argv[1:4]
maps = []  # (lo, hi, name, path, file offset)
try:
    for line in open(mapsf):
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split('-'))
        path = f[5] if len(f) > 5 else '[anon]'
        maps.append((lo, hi, path.split('/')[-1], path, int(f[2], 16)))
except FileNotFoundError:
    pass
# The engine's functions, to name the code that touches each line: its
# symbols' addresses are offsets from the lowest mapping of the file.
syms, keys, so_base = [], [], None
if so:
    bases = [lo - off for lo, hi, _, path, off in maps if path == so]
    if bases:
        so_base = min(bases)
        out = subprocess.run(['nm', '-C', '--defined-only', so], capture_output=True, text=True)
        for l in out.stdout.splitlines():
            p = l.split(' ', 2)
            if len(p) == 3 and p[1] in 'tTwW':
                syms.append((int(p[0], 16), p[2]))
        syms.sort()
        keys = [a for a, _ in syms]
fn_of = {}
def function(addr):
    """The engine function at code address `addr`, else its mapping's name."""
    name = fn_of.get(addr)
    if name is None:
        name = '?'
        for lo, hi, n, path, off in maps:
            if lo <= addr < hi:
                name = n
                if path == so and keys:
                    i = bisect.bisect_right(keys, addr - so_base) - 1
                    if i >= 0:
                        # without the parameters (but keeping namespaces)
                        name = syms[i][1].replace('(anonymous namespace)', '{anon}').split('(')[0]
                break
        fn_of[addr] = name
    return name
fio_names = ('fio', 'libc.so.6')
def where(page):
    a = page << 12
    for lo, hi, name, _, _ in maps:
        if lo <= a < hi:
            return name
    return '?'
# Each window runs from one io_uring_enter (syscall 426) to the next.
# first[line]: the function that touched the line first in this window.
windows, code, data, lines, n, started = [], set(), set(), set(), 0, False
first, fio_lines, cur = {}, set(), '?'
firstp, fio_pages = {}, set()  # the same for data pages
for line in open(log, errors='replace'):
    if line.startswith('SYSCALL'):
        if '(426)' in line:
            if started:
                owners = collections.Counter(
                    f for l, f in first.items() if l not in fio_lines and f not in fio_names)
                powners = collections.Counter(
                    (f, where(pg)) for pg, f in firstp.items()
                    if pg not in fio_pages and f not in fio_names)
                windows.append((code, data, lines, n, owners, powners))
            started, code, data, lines, n = True, set(), set(), set(), 0
            first, fio_lines, firstp, fio_pages = {}, set(), {}, set()
        continue
    if not started or len(line) < 4:
        continue
    try:
        addr = int(line[3:].split(',')[0], 16)
    except ValueError:
        continue
    if line[:2] == 'I ':
        code.add(addr >> 12)
        n += 1
        if so_base is not None:
            cur = function(addr)
    elif line[:2] in (' L', ' S', ' M'):
        data.add(addr >> 12)
        lines.add(addr >> 6)
        if so_base is not None:
            first.setdefault(addr >> 6, cur)
            firstp.setdefault(addr >> 12, cur)
            if cur in fio_names:
                fio_lines.add(addr >> 6)
                fio_pages.add(addr >> 12)
w = windows[len(windows) // 5:]
if not w:
    sys.exit('read_pages: no io_uring_enter calls in the trace')
print('per read, median of %d reads:' % len(w))
for name, get in (('code pages', lambda x: len(x[0])), ('data pages', lambda x: len(x[1])),
                  ('data lines', lambda x: len(x[2])), ('instructions', lambda x: x[3])):
    print('  %-13s %6.0f' % (name, statistics.median(get(x) for x in w)))
by = collections.Counter()
for x in w:
    for p in x[0]:
        by[('code', where(p))] += 1
    for p in x[1]:
        by[('data', where(p))] += 1
print('pages per read by mapping:')
for (kind, name), c in sorted(by.items(), key=lambda t: -t[1]):
    if c / len(w) >= 0.05:
        print('  %s %-32s %5.2f' % (kind, name, c / len(w)))
if so_base is not None:
    owners = collections.Counter()
    for x in w:
        owners.update(x[4])
    print('data lines per read the engine adds, by the function first touching them '
          '(%.1f in all):' % (sum(owners.values()) / len(w)))
    for name, c in owners.most_common():
        if c / len(w) >= 0.05:
            print('  %5.2f %s' % (c / len(w), name[:90]))
    powners = collections.Counter()
    for x in w:
        powners.update(x[5])
    print('data pages per read the engine adds, by the function first touching them '
          'and the mapping (%.1f in all):' % (sum(powners.values()) / len(w)))
    for (name, m), c in powners.most_common():
        if c / len(w) >= 0.05:
            print('  %5.2f %-70s %s' % (c / len(w), name[:70], m))
EOF
[ "$keep" = 1 ] || rm -f "$log"
