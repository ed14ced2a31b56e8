# libmoe build. `make` builds build/libmoe.a, build/libmoe.so and build/moe;
# `make demo` runs the main job; `make test` runs every test.
# Missing system packages are installed by tools/deps.sh (as root with
# apt-get) or it stops with the exact command to run.

CC       ?= cc
# GEMMs: oneDNN (Debian's libdnnl-dev, the OpenMP build: its threads are the
# same OpenMP runtime as ours; libmoe runs each call single-threaded inside
# its own regions, see src/ops/gemm.c and src/kernels/onednn.c).
OPT      ?= -O2
SAN      ?=
BUILD    ?= build

# One build for every CPU of the architecture (README "Every CPU"): the
# library, the tool and the tests are built for a baseline (x86-64-v2;
# armv8-a) and the kernels of src/kernels/<isa>/ are each built with their
# ISA's flags and chosen at run time (MOE_MAX_CPU_ISA caps the choice).
# NATIVE=1 builds everything else for this machine (-march=native): faster
# elsewhere by a few percent at most, and the result may not run on an older CPU.
MOE_ARCH := $(firstword $(subst -, ,$(shell $(CC) -dumpmachine)))
NATIVE   ?= 0
ifeq ($(NATIVE),1)
ARCHFLAGS ?= -march=native
else ifeq ($(MOE_ARCH),x86_64)
ARCHFLAGS ?= -march=x86-64-v2
else
ARCHFLAGS ?=
endif
KERNEL_ISAS = $(if $(filter x86_64,$(MOE_ARCH)),x86_avx2 x86_avx512 x86_avx512bf16,$(if $(filter aarch64,$(MOE_ARCH)),arm_neon))
ISA_x86_avx2       = -mavx2 -mfma
ISA_x86_avx512     = $(ISA_x86_avx2) -mavx512f -mavx512bw -mavx512dq -mavx512vl
ISA_x86_avx512bf16 = $(ISA_x86_avx512) -mavx512bf16
ISA_arm_neon       =

# SYS_CFLAGS / SYS_LDFLAGS: where to find the dependencies when not in the
# system paths (make test-arm64: -I/-L of the arm64 oneDNN in build-arm64/sysroot).
SYS_CFLAGS  ?=
SYS_LDFLAGS ?=

# -fvisibility=hidden: libmoe.so exports the public API only (MOE_API in moe.h).
# -ffp-contract=off: no a*b+c contracted into an fma behind the code's back
# (gcc's default for -std=c11; said here for every compiler): the kernels'
# bit-for-bit promises rest on it.
CFLAGS  = $(OPT) $(ARCHFLAGS) -g -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -ffp-contract=off \
          -fPIC -fopenmp -fvisibility=hidden $(SYS_CFLAGS) -Iinclude -Isrc/core -Isrc/ops -Isrc/layers -Isrc/kernels \
          -Isrc/bank $(SAN)
LDFLAGS = -fopenmp $(SYS_LDFLAGS) $(SAN)
LDLIBS  = -ldnnl -lcjson -lm

# The version (moe.h's MOE_VERSION) and the soname libmoe.so.MAJOR.
VERSION := $(shell sed -n 's/^\#define MOE_VERSION "\(.*\)"/\1/p' include/moe.h)
MAJOR   := $(firstword $(subst ., ,$(VERSION)))
PREFIX  ?= /usr/local
DESTDIR ?=

# Expert parallelism over MPI (include/moe_mpi.h, src/dist, build/libmoe_mpi.a,
# `moe ... --ep` under mpirun) is built whenever mpicc is found (tools/deps.sh
# installs OpenMPI); MPI=0 builds without it, MPI=1 insists on it. libmoe.a
# and libmoe.so never depend on MPI.
MPI      ?= $(if $(shell command -v mpicc 2>/dev/null),1,0)
ifeq ($(MPI),1)
MPI_CFLAGS := $(shell mpicc --showme:compile)
MPI_LIBS   := $(shell mpicc --showme:link)
MPI_LIB     = $(BUILD)/libmoe_mpi.a
MPI_TEST_BIN = $(BUILD)/tests/mpi/test_ep
CLI_EP      = tools/moe/ep_mpi.c
else
CLI_EP      = tools/moe/ep_none.c
endif

# The CUDA backend (include/moe_cuda.h, src/cuda/*.cu, build/libmoe_cuda.a,
# build/tests/cuda/*) is built whenever nvcc is found, on PATH or at
# /usr/local/cuda/bin/nvcc (`make cuda` builds just the library); CUDA=0
# builds without it, CUDA=1 insists on it. libmoe.a and libmoe.so never
# depend on CUDA. CUDA_ARCH: SASS for sm_90 (H100/H200) and PTX for
# compute_80, which the driver compiles for any newer GPU.
NVCC     ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CUDA     ?= $(if $(NVCC),1,0)
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80
ifeq ($(CUDA),1)
ifeq ($(NVCC),)
$(error CUDA=1 but nvcc is not found (PATH or /usr/local/cuda/bin/nvcc): install the CUDA toolkit or set NVCC=)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS = -O2 -g -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra,-Wno-unused-parameter \
            -Iinclude
CUDA_LIBS = -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++
CUDA_SRC  = $(sort $(wildcard src/cuda/*.cu))
CUDA_OBJ  = $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)
CUDA_LIB  = $(BUILD)/libmoe_cuda.a
CUDA_TEST_BIN = $(BUILD)/tests/cuda/test_cuda $(BUILD)/tests/cuda/bench_cuda
endif

LIB_SRC  = $(filter-out src/dist/%,$(sort $(wildcard src/*/*.c))) $(sort $(wildcard src/kernels/generic/*.c)) \
           $(foreach i,$(KERNEL_ISAS),$(sort $(wildcard src/kernels/$(i)/*.c)))
LIB_OBJ  = $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
DIST_SRC = $(sort $(wildcard src/dist/*.c))
DIST_OBJ = $(DIST_SRC:%.c=$(BUILD)/obj/%.o)
CLI_SRC  = $(filter-out tools/moe/ep_%.c,$(sort $(wildcard tools/moe/*.c))) $(CLI_EP)
CLI_OBJ  = $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TEST_SRC = $(sort $(wildcard tests/test_*.c))
TEST_BIN = $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC = $(sort $(wildcard bench/*.c))
BENCH_BIN = $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
HDRS     = include/moe.h include/moe_mpi.h $(wildcard src/*/*.h) $(wildcard src/kernels/*/*.h) $(wildcard tools/moe/*.h)

.PHONY: cuda all build-all deps deps-test deps-fuzz demo test test-c test-mpi-bins test-asan test-valgrind bench fuzz clean \
        install uninstall test-torch2 test-arm64

# deps first, then a fresh make that sees what deps installed (mpicc)
all: deps
	@$(MAKE) --no-print-directory build-all

build-all: $(BUILD)/libmoe.a $(BUILD)/libmoe.so $(BUILD)/moe $(MPI_LIB) $(CUDA_LIB)

# DEPS: the tools/deps.sh mode the object rules check first (arm64 for the
# cross build of make test-arm64)
DEPS ?= build
deps:
	@sh tools/deps.sh $(DEPS)

deps-test:
	@sh tools/deps.sh test

deps-fuzz:
	@sh tools/deps.sh build
	@sh tools/deps.sh fuzz

$(BUILD)/obj/%.o: %.c $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(ISAFLAGS) -c $< -o $@

# each kernel folder with its ISA's flags (and only those files)
$(foreach i,$(KERNEL_ISAS),$(eval $(BUILD)/obj/src/kernels/$(i)/%.o build-fuzz/obj/src/kernels/$(i)/%.o: ISAFLAGS = $(ISA_$(i))))

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# libmoe.so.VERSION with the soname libmoe.so.MAJOR; libmoe.so.MAJOR and
# libmoe.so are links to it
$(BUILD)/libmoe.so: $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,libmoe.so.$(MAJOR) -o $@.$(VERSION) $^ $(LDFLAGS) $(LDLIBS)
	ln -sf libmoe.so.$(VERSION) $(BUILD)/libmoe.so.$(MAJOR)
	ln -sf libmoe.so.$(VERSION) $@

$(BUILD)/moe: $(CLI_OBJ) $(BUILD)/libmoe.a $(MPI_LIB)
	$(CC) -o $@ $(CLI_OBJ) $(MPI_LIB) $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS) $(MPI_LIBS)

# the MPI parts: only these objects see mpi.h
$(BUILD)/obj/src/dist/%.o: src/dist/%.c $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -c $< -o $@

$(BUILD)/obj/tools/moe/ep_mpi.o: tools/moe/ep_mpi.c $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -Itools/moe -c $< -o $@

$(BUILD)/libmoe_mpi.a: $(DIST_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tests/mpi/%: tests/mpi/%.c tests/check.h $(BUILD)/libmoe.a $(MPI_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -Itests -o $@ $< $(MPI_LIB) $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS) $(MPI_LIBS)

test-mpi-bins: $(MPI_TEST_BIN)

# the CUDA parts: only these objects see CUDA headers
ifeq ($(CUDA),1)
cuda: $(CUDA_LIB) $(CUDA_TEST_BIN)

$(BUILD)/obj/src/cuda/%.o: src/cuda/%.cu include/moe.h include/moe_cuda.h $(wildcard src/cuda/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/libmoe_cuda.a: $(CUDA_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tests/cuda/%: tests/cuda/%.c tests/check.h include/moe_cuda.h $(BUILD)/libmoe.a $(CUDA_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -I$(CUDA_HOME)/include -o $@ $< $(CUDA_LIB) $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS) \
	    $(CUDA_LIBS)
else
cuda:
	@echo "make cuda: nvcc not found (PATH or /usr/local/cuda/bin/nvcc) or CUDA=0: install the CUDA toolkit" \
	      "and run make cuda (or make CUDA=1)"; exit 1
endif

$(BUILD)/tests/%: tests/%.c tests/check.h $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS)

# The main job: train the MoE transformer on the multilingual fortunes corpus
# (tools/deps.sh corpus installs it; if it cannot, on the built-in task corpus).
demo: all
	@if sh tools/deps.sh corpus; then ./$(BUILD)/moe train; else \
	    echo "make demo: the fortunes packages are not installed (see above): training on the built-in task corpus"; \
	    ./$(BUILD)/moe train --corpus tasks; fi

test-c: all $(TEST_BIN) $(MPI_TEST_BIN)

# Every test: C unit/gradient/bad-input tests, CLI tests, PyTorch parity, and
# the C tests again under ASan + UBSan. Ends with "N passed, N failed".
test: deps-test all $(TEST_BIN) $(BENCH_BIN) $(CUDA_TEST_BIN)
	@$(MAKE) --no-print-directory test-mpi-bins
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -DMOE_GEMM_PROBE" test-c
	@sh tests/run.sh

test-asan:
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -DMOE_GEMM_PROBE" test-c
	@ONLY_ASAN=1 sh tests/run.sh

bench: all $(BENCH_BIN)
	./$(BUILD)/moe bench
	./$(BUILD)/moe bench --expert swiglu
	./$(BUILD)/moe bench --layer gshard
	./$(BUILD)/moe bench --layer hierarchical
	./$(BUILD)/moe bench --layer soft_dynamic
	./$(BUILD)/moe bench --layer soft
	for r in switch mixtral st_moe deepseek_v3 expert_choice; do ./$(BUILD)/moe bench --router $$r; done
	./$(BUILD)/moe bench --router deepseek_v3 --shared 1 --expert swiglu
	./$(BUILD)/moe bench --decode
	./$(BUILD)/moe bench --tokens 8192 --dim 1024 --hidden 4096 --experts 8 --iters 3
	for p in "" --bf16; do for t in 1 2; do ./$(BUILD)/moe bench --threads $$t $$p; \
	    ./$(BUILD)/moe bench --layer gshard --threads $$t $$p; done; done
	./$(BUILD)/moe bench --bf16 --expert swiglu
	./$(BUILD)/moe bench --bf16 --layer hierarchical
	./$(BUILD)/moe bench --bf16 --decode
	@echo "real model shapes (about 15 GB of memory, several minutes):"
	for p in "" --bf16; do for t in 256 2048; do \
	    ./$(BUILD)/moe bench --tokens $$t --dim 4096 --hidden 14336 --experts 8 --top-k 2 --expert swiglu --iters 2 $$p; \
	    done; done
	for p in "" --bf16; do for t in 1024 4096; do \
	    ./$(BUILD)/moe bench --tokens $$t --dim 2048 --hidden 1408 --experts 64 --top-k 6 --shared 2 \
	        --router deepseek_v3 --expert swiglu --iters 2 $$p; done; done
	/usr/bin/python3 bench/torch_bench.py --table

# The C tests on arm64, cross-built (aarch64-linux-gnu-gcc) into build-arm64
# and run under qemu-aarch64-static, at the baseline level and at neon, so
# the arm_neon kernels and every #if __aarch64__ are tested on any x86 host
# (tests/run_arm64.sh; slow tests shortened under emulation, said in its
# output). tools/deps.sh arm64 installs the cross tools and puts Debian's
# arm64 oneDNN into build-arm64/sysroot (not installed: libdnnl-dev:arm64
# conflicts with the amd64 one). Builds libmoe.a and the tests only, without
# MPI or CUDA.
ARM64_CC      ?= aarch64-linux-gnu-gcc
ARM64_SYSROOT  = build-arm64/sysroot
test-arm64:
	@sh tools/deps.sh arm64 $(ARM64_SYSROOT)
	@$(MAKE) --no-print-directory BUILD=build-arm64 CC=$(ARM64_CC) MPI=0 CUDA=0 NATIVE=0 DEPS='arm64 $(ARM64_SYSROOT)' \
	    SYS_CFLAGS=-I$(ARM64_SYSROOT)/usr/include SYS_LDFLAGS=-L$(ARM64_SYSROOT)/usr/lib/aarch64-linux-gnu \
	    build-arm64/libmoe.a $(TEST_SRC:tests/%.c=build-arm64/tests/%)
	@SYSROOT=$(ARM64_SYSROOT) sh tests/run_arm64.sh

# The C tests under valgrind memcheck (errors and definite leaks fail). Valgrind
# hides AVX-512 from cpuid, so they run at kernel level avx2. test_gradcheck and
# test_faults take many minutes there; they run under ASan in `make test`.
VALGRIND_TESTS = test_attn test_badinput test_bf16 test_corpus test_fortunes test_gshard test_kernels test_layers test_lm test_numerics test_router test_safetensors test_soft test_vmath
test-valgrind:
	@sh tools/deps.sh valgrind
	@$(MAKE) --no-print-directory BUILD=build-vg OPT=-O1 SAN="-DMOE_GEMM_PROBE -DMOE_VALGRIND" test-c
	@for t in $(VALGRIND_TESTS); do \
	    valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
	        build-vg/tests/$$t >build-vg/$$t.valgrind 2>&1 || { tail -n 40 build-vg/$$t.valgrind; exit 1; }; \
	    echo "valgrind $$t: $$(grep -o '[0-9]* passed, [0-9]* failed' build-vg/$$t.valgrind), no memcheck errors"; \
	done

# libFuzzer targets (clang, ASan + UBSan): the safetensors reader, JSON configs
# with the layers they describe, and `moe forward`'s input handling. Each runs
# FUZZ_SECONDS from the seed corpus in fuzz/corpus/ (new inputs go to
# build-fuzz/corpus_*); a crash stops make with the input in build-fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = safetensors config forward
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=c11 \
             -D_GNU_SOURCE -DMOE_GEMM_PROBE -Wno-unknown-pragmas -Iinclude -Isrc/core -Isrc/ops -Isrc/layers -Isrc/kernels -Isrc/bank
# the library's objects, each kernel folder with its ISA's flags (ISAFLAGS above)
FUZZ_OBJ = $(LIB_SRC:%.c=build-fuzz/obj/%.o)
.SECONDARY: $(FUZZ_OBJ)
build-fuzz/obj/%.o: %.c $(HDRS) | deps-fuzz
	@mkdir -p $(dir $@)
	clang $(FUZZ_FLAGS) $(ARCHFLAGS) -ffp-contract=off $(ISAFLAGS) -c $< -o $@

build-fuzz/fuzz_%: fuzz/fuzz_%.c $(FUZZ_OBJ) $(HDRS) | deps-fuzz
	@mkdir -p build-fuzz
	clang $(FUZZ_FLAGS) $(ARCHFLAGS) $< $(FUZZ_OBJ) $(if $(filter %forward,$*),tools/moe/forward.c tools/moe/forward_ep.c tools/moe/ep_none.c tools/moe/cli.c) \
	    -o $@ -ldnnl -lcjson -lm

fuzz: $(FUZZ_TARGETS:%=build-fuzz/fuzz_%)
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p build-fuzz/corpus_$$t; \
	    ./build-fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -close_fd_mask=3 -rss_limit_mb=4096 \
	        -artifact_prefix=build-fuzz/crash_$$t- build-fuzz/corpus_$$t fuzz/corpus/$$t \
	        >build-fuzz/$$t.log 2>&1 || { tail -n 40 build-fuzz/$$t.log; exit 1; }; \
	    echo "fuzz $$t: $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' build-fuzz/$$t.log), no crash"; \
	done

# The Python suite against a current PyTorch 2.x from PyPI, in a virtual
# environment (build/venv-torch2: about 5.4 GB with PyPI's CUDA-enabled wheels,
# 2 minutes to install here), with the package installed by pip from
# ./python. Not in `make test` / CI: the download is too large to repeat on
# every run; README "Python and PyTorch" names the versions last tested.
TORCH2_VENV ?= build/venv-torch2
test-torch2: all
	@[ -x $(TORCH2_VENV)/bin/python ] || /usr/bin/python3 -m venv $(TORCH2_VENV)
	@$(TORCH2_VENV)/bin/python -c "import torch, numpy" 2>/dev/null || \
	    $(TORCH2_VENV)/bin/pip install -q torch numpy setuptools
	@$(TORCH2_VENV)/bin/pip install -q --no-deps --no-build-isolation --force-reinstall ./python
	@$(TORCH2_VENV)/bin/python -c "import torch, numpy; print('PyTorch', torch.__version__, 'numpy', numpy.__version__)"
	@cd /tmp && LIBMOE_LIBRARY=$(CURDIR)/$(BUILD)/libmoe.so MOE_PY_INSTALLED=1 \
	    $(abspath $(TORCH2_VENV))/bin/python $(CURDIR)/tests/python/test_torch.py

# make install [PREFIX=/usr/local] [DESTDIR=]: the header(s), libmoe.so.VERSION
# (soname libmoe.so.MAJOR) and its links, libmoe.a (and libmoe_mpi.a), moe.pc,
# the CMake package (find_package(libmoe)), the tool and its man page, and the
# Python package (when python/libmoe exists) into Debian's python3 path for
# PREFIX, configured to load this libmoe.so. make uninstall removes them.
PYDIR ?= $(PREFIX)/lib/python3/dist-packages
INSTALLED = include/moe.h include/moe_mpi.h lib/libmoe.so.$(VERSION) lib/libmoe.so.$(MAJOR) lib/libmoe.so \
            lib/libmoe.a lib/libmoe_mpi.a include/moe_cuda.h lib/libmoe_cuda.a lib/pkgconfig/moe.pc lib/cmake/libmoe/libmoeConfig.cmake \
            lib/cmake/libmoe/libmoeConfigVersion.cmake bin/moe share/man/man1/moe.1
install: all
	@d="$(DESTDIR)$(PREFIX)"; \
	mkdir -p "$$d/include" "$$d/lib/pkgconfig" "$$d/lib/cmake/libmoe" "$$d/bin" "$$d/share/man/man1" && \
	install -m 644 include/moe.h "$$d/include/" && \
	install -m 755 $(BUILD)/libmoe.so.$(VERSION) "$$d/lib/" && \
	ln -sf libmoe.so.$(VERSION) "$$d/lib/libmoe.so.$(MAJOR)" && ln -sf libmoe.so.$(MAJOR) "$$d/lib/libmoe.so" && \
	install -m 644 $(BUILD)/libmoe.a "$$d/lib/" && \
	if [ -f $(BUILD)/libmoe_mpi.a ]; then install -m 644 $(BUILD)/libmoe_mpi.a "$$d/lib/" && \
	    install -m 644 include/moe_mpi.h "$$d/include/"; fi && \
	if [ -f $(BUILD)/libmoe_cuda.a ]; then install -m 644 $(BUILD)/libmoe_cuda.a "$$d/lib/" && \
	    install -m 644 include/moe_cuda.h "$$d/include/"; fi && \
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' \
	    tools/pkg/moe.pc.in >"$$d/lib/pkgconfig/moe.pc" && \
	for f in libmoeConfig libmoeConfigVersion; do \
	    sed -e 's|@VERSION@|$(VERSION)|' -e 's|@MAJOR@|$(MAJOR)|' tools/pkg/$$f.cmake.in \
	        >"$$d/lib/cmake/libmoe/$$f.cmake" || exit 1; done && \
	install -m 755 $(BUILD)/moe "$$d/bin/" && install -m 644 docs/moe.1 "$$d/share/man/man1/" && \
	if [ -d python/libmoe ]; then mkdir -p "$(DESTDIR)$(PYDIR)" && rm -rf "$(DESTDIR)$(PYDIR)/libmoe" && \
	    cp -r python/libmoe "$(DESTDIR)$(PYDIR)/" && rm -rf "$(DESTDIR)$(PYDIR)/libmoe/__pycache__" && \
	    echo 'LIBRARY = "$(PREFIX)/lib/libmoe.so.$(MAJOR)"' >"$(DESTDIR)$(PYDIR)/libmoe/_install.py"; fi && \
	echo "installed libmoe $(VERSION) into $$d"

uninstall:
	@d="$(DESTDIR)$(PREFIX)"; for f in $(INSTALLED); do rm -f "$$d/$$f"; done; \
	rmdir "$$d/lib/cmake/libmoe" 2>/dev/null; rm -rf "$(DESTDIR)$(PYDIR)/libmoe"; \
	echo "removed libmoe $(VERSION) from $$d"

clean:
	rm -rf build build-asan build-fuzz build-vg build-arm64
