# Shared by the shell tests (sourced after `cd` to the repository root):
# $moe, a temporary directory $tmp removed on exit, pass/fail counters and
#   expect CODE PATTERN CMD...   the exit code, and PATTERN in stdout+stderr.
moe=${MOE_BIN:-build/moe}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

expect() {
    code=$1 pat=$2
    shift 2
    "$@" >"$tmp/out" 2>&1
    rc=$?
    if [ "$rc" -ne "$code" ]; then bad "$* exited $rc, want $code: $(head -c 400 "$tmp/out")"; return; fi
    if ! grep -q -e "$pat" "$tmp/out"; then bad "$* output lacks '$pat': $(head -c 400 "$tmp/out")"; return; fi
    ok
}
