#!/bin/sh
# Runs every test and ends with one line "N passed, N failed" (the sum of the
# checks of every test program, CLI check and parity case). Called by
# `make test`; ONLY_ASAN=1 runs just the sanitizer build (`make test-asan`).
# A program that dies without its summary line counts as one failure. A
# program may add ", N skipped" to its summary (checks it could not run here,
# e.g. GPU checks without a CUDA device): they are shown and totalled, never
# counted as passed.
set -u
cd "$(dirname "$0")/.."
# tools/deps.sh test installs the fortunes: their test fails (not skips) without them
export MOE_REQUIRE_FORTUNES=1
# the first pass runs at the CPU's best level; the lower levels come after (below)
unset MOE_MAX_CPU_ISA
. tests/runlib.sh

if [ "${ONLY_ASAN:-0}" != 1 ]; then
    for t in build/tests/test_*; do
        [ -x "$t" ] && run "$(basename "$t")" "$t"
    done
    # the CUDA backend: its GPU checks count as skipped without a device
    if [ -x build/tests/cuda/test_cuda ]; then
        run "cuda test_cuda" build/tests/cuda/test_cuda
    else
        echo "skip cuda test_cuda: not built (nvcc not found, or CUDA=0)"
        skip=$((skip + 1))
    fi
fi
# the expert-parallel test under ASan + UBSan (leak checks off: OpenMPI unloads its
# components before LeakSanitizer runs, so its own allocations show as unattributable leaks)
for np in 2 4; do
    if [ -x build-asan/tests/mpi/test_ep ]; then
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=0 \
            UBSAN_OPTIONS=print_stacktrace=1 run "asan+ubsan mpi test_ep P=$np" \
            timeout 600 mpirun --oversubscribe -np $np -x ASAN_OPTIONS -x UBSAN_OPTIONS build-asan/tests/mpi/test_ep
    else
        echo "FAIL asan+ubsan mpi test_ep P=$np: build-asan/tests/mpi/test_ep missing (needs mpicc)"
        fail=$((fail + 1))
    fi
done
for t in build-asan/tests/test_*; do
    [ -x "$t" ] && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
        run "asan+ubsan $(basename "$t")" "$t"
done
if [ "${ONLY_ASAN:-0}" != 1 ]; then
    # expert parallelism over MPI at P = 1, 2 and 4 (OpenMPI as root needs its
    # two variables; more ranks than cores needs --oversubscribe). Missing
    # mpirun or the test program is a failure, not a skip.
    for np in 1 2 4; do
        if command -v mpirun >/dev/null 2>&1 && [ -x build/tests/mpi/test_ep ]; then
            OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
                run "mpi test_ep P=$np" timeout 600 mpirun --oversubscribe -np $np build/tests/mpi/test_ep
        else
            echo "FAIL mpi test_ep P=$np: mpirun or build/tests/mpi/test_ep missing (tools/deps.sh test installs" \
                 "OpenMPI; make builds the test when mpicc is found)"
            fail=$((fail + 1))
        fi
    done
    run "mpi forward --ep (PyTorch files)" /usr/bin/python3 tests/mpi/run_forward_ep.py
    run "mpi train --ep" sh tests/mpi/train_ep.sh
    run "install" sh tests/install.sh
    run "cli" sh tests/cli.sh
    run "portable (qemu: an older x86-64 CPU)" sh tests/portable.sh
    run "train" sh tests/train.sh
    run "parity (PyTorch)" /usr/bin/python3 tests/parity/run_parity.py
    run "parity soft (PyTorch)" /usr/bin/python3 tests/parity/run_parity_soft.py
    run "parity router (PyTorch)" /usr/bin/python3 tests/parity/run_parity_router.py
    run "parity lm (PyTorch)" /usr/bin/python3 tests/parity/run_parity_lm.py
    run "python (PyTorch)" /usr/bin/python3 tests/python/test_torch.py
    # Every kernel level this CPU has below its best (README "Every CPU"): the C
    # suite, the parity and the Python tests again with MOE_MAX_CPU_ISA capping
    # libmoe's kernels and oneDNN's, so an AVX-512 machine proves the AVX2 and
    # baseline paths too. (The runs above were at the best level.)
    best=$(build/moe cpu --levels | tail -n 1)
    for level in $(build/moe cpu --levels); do
        [ "$level" = "$best" ] && continue
        export MOE_MAX_CPU_ISA=$level
        for t in build/tests/test_*; do
            [ -x "$t" ] && run "[$level] $(basename "$t")" "$t"
        done
        run "[$level] parity (PyTorch)" /usr/bin/python3 tests/parity/run_parity.py
        run "[$level] parity soft (PyTorch)" /usr/bin/python3 tests/parity/run_parity_soft.py
        run "[$level] parity router (PyTorch)" /usr/bin/python3 tests/parity/run_parity_router.py
        run "[$level] parity lm (PyTorch)" /usr/bin/python3 tests/parity/run_parity_lm.py
        run "[$level] python (PyTorch)" /usr/bin/python3 tests/python/test_torch.py
        unset MOE_MAX_CPU_ISA
    done
    [ -n "$best" ] || { echo "FAIL kernel levels: build/moe cpu --levels printed nothing"; fail=$((fail + 1)); }
fi
if [ "$skip" -ne 0 ]; then echo "$pass passed, $fail failed, $skip skipped"; else echo "$pass passed, $fail failed"; fi
[ "$fail" -eq 0 ]
