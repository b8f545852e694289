#!/bin/bash
# Installs the Debian packages kvblk needs to build and test. Idempotent:
# when everything is present it only checks, and it runs apt-get update
# itself before installing anything.
set -euo pipefail

PKGS=(
  g++ make pkg-config
  liburing-dev libtbb-dev libgtest-dev libgmock-dev zlib1g-dev libzstd-dev
  qemu-utils
  clang libclang-rt-14-dev  # libFuzzer and the sanitizers (make fuzz, tests/interop/fuzz_test.sh)
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
echo "deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
