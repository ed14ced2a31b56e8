# Shared by tests/run.sh and tests/run_arm64.sh (sourced): the counters and
#   run NAME CMD...   run a test program and add its "N passed, N failed"
# A program that dies without its summary line counts as one failure; a
# nonzero exit with "0 failed" counts as one; ", N skipped" is totalled,
# never counted as passed. Each line gives the seconds the program took, and
# "shortened" with the program's own line when it ran its quick mode
# (MOE_TEST_QUICK=1, under emulation).
pass=0
fail=0
skip=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

run() {
    name=$1
    shift
    t0=$(date +%s)
    "$@" >"$log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    line=$(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $name: exited $rc without a summary (${secs} s)"
        tail -n 20 "$log"
        fail=$((fail + 1))
        return
    fi
    p=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "passed,") print $(i - 1)}')
    f=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "failed" || $i == "failed,") print $(i - 1)}')
    s=$(echo "$line" | awk '{for (i = 2; i <= NF; i++) if ($i == "skipped" || $i == "skipped,") print $(i - 1)}')
    s=${s:-0}
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    pass=$((pass + p))
    fail=$((fail + f))
    skip=$((skip + s))
    short=""
    grep -q 'MOE_TEST_QUICK=1' "$log" && short="; shortened: $(grep -m 1 'MOE_TEST_QUICK=1' "$log")"
    if [ "$f" -ne 0 ]; then
        echo "FAIL $name ($p passed, $f failed, exit $rc, ${secs} s$short):"
        grep -E 'FAIL|ERROR|Sanitizer|runtime error' "$log" | head -n 30
    elif [ "$s" -ne 0 ]; then
        echo "ok   $name ($p checks; $s SKIPPED: $(grep -m 1 'skipped:' "$log"); ${secs} s$short)"
    else
        echo "ok   $name ($p checks, ${secs} s$short)"
    fi
}
