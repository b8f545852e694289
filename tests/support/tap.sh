# Shared by the interop scripts: TAP-like result lines.
# The including script sets T (its temp dir), failures=0 and checks=0; a
# command's output saved in $T/.evidence is shown under a failing line.

pass() {
  checks=$((checks + 1))
  echo "ok - $1"
}

fail() {
  checks=$((checks + 1))
  failures=$((failures + 1))
  echo "not ok - $1"
  if [ -s "$T/.evidence" ]; then sed 's/^/#   /' "$T/.evidence" | head -n 30; fi
}

# check DESC CMD...: CMD succeeds (its output is shown if it does not).
check() {
  local desc=$1
  shift
  if "$@" >"$T/.evidence" 2>&1; then pass "$desc"; else fail "$desc"; fi
}
