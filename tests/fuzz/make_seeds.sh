#!/bin/bash
# Builds the seed corpora of the fuzz targets under OUT_DIR (default
# build-fuzz/seeds), one directory per target. Idempotent: a corpus that
# exists is left alone (delete OUT_DIR to rebuild).
#
# image_fuzz: small images (4 MiB virtual) made by qemu-img and qemu-io in
# many configurations -- cluster sizes 512 B to 64 KiB (2 MiB clusters would
# make 6 MiB seeds; the fuzzer reaches cluster_bits 21 by mutation), refcount widths 1 to
# 64, v2 and v3, lazy refcounts, zlib and zstd compressed clusters, zero
# clusters, a missing backing file, internal snapshots, extended L2 entries
# (kvblk refuses those) -- each followed by a request script (see the input
# layout in image_fuzz.cc).
# virtqueue_fuzz, vhost_user_fuzz: a few byte strings; their input formats
# make most inputs meaningful, so libFuzzer builds the rest.
set -euo pipefail
out=${1:-build-fuzz/seeds}
command -v qemu-img >/dev/null || { echo "make_seeds.sh: qemu-img is missing" >&2; exit 1; }
command -v python3 >/dev/null || { echo "make_seeds.sh: python3 is missing" >&2; exit 1; }

if [ ! -d "$out/image_fuzz" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/image_fuzz"
  # make NAME CREATE_OPTIONS [QEMU_IO_COMMANDS...]
  make_image() {
    local name=$1 opts=$2
    shift 2
    local img=$tmp/$name.qcow2
    qemu-img create -q -f qcow2 -o "$opts" "$img" 4M
    local cmd args=()
    for cmd in "$@"; do args+=(-c "$cmd"); done
    if [ ${#args[@]} -gt 0 ]; then qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null; fi
  }
  data=('write -P 0x5a 0 64k' 'write -P 0xa5 1M 4k' 'write -z 2M 128k')
  make_image c512 cluster_size=512 "${data[@]}"
  make_image c4k cluster_size=4096 "${data[@]}"
  make_image c64k cluster_size=65536 "${data[@]}"
  for bits in 1 2 4 8 16 32 64; do
    make_image "rc$bits" "cluster_size=4096,refcount_bits=$bits" "${data[@]}"
  done
  make_image v2 compat=0.10,cluster_size=4096 'write -P 7 0 8k' 'write -P 8 3M 4k'
  make_image lazy compat=1.1,lazy_refcounts=on,cluster_size=4096 "${data[@]}"
  make_image zlib cluster_size=4096,compression_type=zlib 'write -c -P 0x33 0 4k' \
    'write -c -P 0x44 8k 4k' 'write -P 0x55 64k 4k'
  make_image zstd cluster_size=4096,compression_type=zstd 'write -c -P 0x33 0 4k' \
    'write -P 0x55 64k 4k'
  make_image discard cluster_size=4096 'write -P 9 0 64k' 'discard 16k 16k' 'write -z -u 32k 8k'
  make_image extl2 cluster_size=65536,extended_l2=on 'write -P 3 0 4k'
  qemu-img create -q -f qcow2 -u -b missing-base.qcow2 -F qcow2 -o cluster_size=4096 \
    "$tmp/backing.qcow2" 4M
  make_image snap cluster_size=4096 'write -P 1 0 16k'
  qemu-img snapshot -c first "$tmp/snap.qcow2"
  qemu-io -f qcow2 -c 'write -P 2 4k 8k' "$tmp/snap.qcow2" >/dev/null
  qemu-img snapshot -c second "$tmp/snap.qcow2"
  make_image snapdel cluster_size=4096 'write -P 1 0 16k'
  qemu-img snapshot -c gone "$tmp/snapdel.qcow2"
  qemu-img snapshot -c kept "$tmp/snapdel.qcow2"
  qemu-img snapshot -d gone "$tmp/snapdel.qcow2"

  # Append a request script to each image: bytes that the target reads from
  # the end (flags last, then the request count, then 9 bytes a request).
  python3 - "$tmp" "$tmp/image_fuzz" <<'EOF'
import glob, os, random, sys
src, dst = sys.argv[1], sys.argv[2]
rng = random.Random(20240601)
for path in sorted(glob.glob(os.path.join(src, "*.qcow2"))):
    image = open(path, "rb").read()
    base = os.path.basename(path)[:-len(".qcow2")]
    for variant in range(3):
        count = rng.randint(4, 16)
        script = bytearray()
        for _ in range(count):
            # In the order the target consumes them (from the end of the
            # input backwards): kind, offset, length, fill, barrier.
            script += bytes([rng.randint(0, 7)])
            script += rng.randint(0, 8192).to_bytes(4, "big")
            script += rng.randint(0, 600).to_bytes(2, "big")
            script += bytes([rng.randint(0, 255), rng.randint(0, 1)])
        flags = [0, 1, 6][variant]  # writable; read-only; writable + repair all
        tail = bytes(reversed(script)) + bytes([count, flags])
        with open(os.path.join(dst, "%s-%d" % (base, variant)), "wb") as f:
            f.write(image + tail)
EOF
  mkdir -p "$out"
  mv "$tmp/image_fuzz" "$out/image_fuzz"
  echo "make_seeds.sh: $(ls "$out/image_fuzz" | wc -l) seeds in $out/image_fuzz"
fi

for target in virtqueue_fuzz vhost_user_fuzz; do
  if [ ! -d "$out/$target" ]; then
    mkdir -p "$out/$target.tmp"
    python3 - "$out/$target.tmp" <<'EOF'
import os, random, sys
rng = random.Random(7)
for i in range(16):
    with open(os.path.join(sys.argv[1], "seed-%02d" % i), "wb") as f:
        f.write(bytes(rng.randint(0, 255) for _ in range(64 + 64 * i)))
EOF
    mv "$out/$target.tmp" "$out/$target"
  fi
done
