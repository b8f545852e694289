"""One "ok - ..." / "not ok - ..." line per check, for the Python tests of
perf/'s scripts (tests/perf/*_test.py), with the evidence of a failure
indented under it; `failures` counts the failed checks."""

failures = 0


def verdict(desc, good, evidence=""):
    """Prints the check's line; on a failure also up to 20 lines of
    `evidence`, and counts it."""
    global failures
    print(("ok - " if good else "not ok - ") + desc)
    if not good:
        failures += 1
        for line in str(evidence).splitlines()[:20]:
            print("#   " + line)
