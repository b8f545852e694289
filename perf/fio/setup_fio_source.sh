#!/bin/bash
# Fetches Debian's fio source (the version that matches the installed fio)
# into BUILD/perf/fio-src, runs its ./configure, and checks that the source
# and the installed binary are the same version. External engines are built
# against these headers; a mismatch would load into fio with the wrong struct
# layouts, so it is an error.
#
# Usage: perf/fio/setup_fio_source.sh [BUILD_DIR]   (default: build)
# Prints the fio source directory on its last line; BUILD/perf/fio-src/fio
# links to it.
# Idempotent: the deb-src entry, the download and configure are cached.
set -euo pipefail

build=${1:-build}
top=$(cd "$(dirname "$0")/../.." && pwd)
case $build in /*) ;; *) build=$top/$build ;; esac
dest=$build/perf/fio-src
srclist=/etc/apt/sources.list.d/kvblk-deb-src.sources

die() { echo "setup_fio_source: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    -o DPkg::Lock::Timeout=600 "$@" >/dev/null
}

command -v fio >/dev/null || apt_install fio
command -v dpkg-source >/dev/null || apt_install dpkg-dev

# 1. A deb-src entry for every enabled Debian "deb" source (deb822 .sources
#    files and one-line .list files), unless one exists already.
have_deb_src() {
  { grep -hsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } | grep -q .
}
if ! have_deb_src; then
  tmp=$(mktemp)
  # deb822: copy each stanza that has "Types: deb" and a Debian URI.
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v RS= -v ORS='\n\n' '
      /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|\n|$)/ && /URIs:[^\n]*debian/ {
        n = split($0, lines, "\n"); out = ""
        for (i = 1; i <= n; i++) {
          if (lines[i] ~ /^#/) continue
          if (lines[i] ~ /^Types:/) lines[i] = "Types: deb-src"
          if (lines[i] ~ /^Enabled:/) continue
          out = out lines[i] "\n"
        }
        printf "%s\n", out
      }' "$f" >> "$tmp"
  done
  # One-line format: "deb [opts] URI suite components" -> deb-src.
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -nE 's/^[[:space:]]*deb([[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]*debian[^[:space:]]*[[:space:]].*)$/deb-src\1/p' \
      "$f" | while read -r line; do
        # Written as a deb822 stanza so one file holds both formats' output.
        set -- $line
        shift
        opts=""
        if [ "${1#[}" != "$1" ]; then opts=$1; shift; fi
        uri=$1; suite=$2; shift 2
        printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n' "$uri" "$suite" "$*"
        case $opts in *signed-by=*)
          sb=${opts#*signed-by=}; sb=${sb%%[] ]*}
          printf 'Signed-By: %s\n' "$sb" ;;
        esac
        printf '\n'
      done >> "$tmp"
  done
  [ -s "$tmp" ] || { rm -f "$tmp"; die "no Debian apt source found to derive a deb-src entry from"; }
  as_root install -m 644 "$tmp" "$srclist"
  rm -f "$tmp"
  echo "setup_fio_source: added $srclist; running apt-get update" >&2
  as_root apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
fi

# 2. The source of the installed package version.
pkg_ver=$(dpkg-query -W -f='${Version}' fio)
upstream=${pkg_ver#*:}; upstream=${upstream%-*}; upstream=${upstream%%+*}
srcdir=$dest/fio-$upstream
stamp=$dest/.fetched-$pkg_ver
if [ ! -f "$stamp" ] || [ ! -d "$srcdir" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  (cd "$dest" && apt-get source -q "fio=$pkg_ver" >/dev/null 2>"$dest/apt-source.log") || {
    # Package lists may predate the deb-src entry: update once and retry.
    as_root apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
    (cd "$dest" && apt-get source -q "fio=$pkg_ver" >/dev/null 2>"$dest/apt-source.log") ||
      die "apt-get source fio=$pkg_ver failed (see $dest/apt-source.log)"
  }
  [ -d "$srcdir" ] || die "apt-get source did not produce $srcdir"
  touch "$stamp"
fi

# 3. configure (generates config-host.h, which fio's headers include).
if [ ! -f "$srcdir/config-host.h" ]; then
  (cd "$srcdir" && ./configure >"$dest/configure.log" 2>&1) ||
    die "fio ./configure failed (see $dest/configure.log)"
fi

# 4. Same version as the binary that will load the engines?
installed=$(fio --version)
[ -f "$srcdir/FIO-VERSION-FILE" ] || (cd "$srcdir" && ./FIO-VERSION-GEN >/dev/null 2>&1 || true)
source_ver=$(sed -n 's/^FIO_VERSION = //p' "$srcdir/FIO-VERSION-FILE" 2>/dev/null || true)
[ -n "$source_ver" ] || source_ver=fio-$upstream
if [ "$source_ver" != "$installed" ]; then
  die "fio source is $source_ver but the installed fio is $installed;" \
      "external engines must be built against the exact installed version" \
      "(remove $dest and rerun after 'apt-get install fio')"
fi
# A stable name for the Makefile.
ln -sfn "fio-$upstream" "$dest/fio"
echo "$srcdir"
