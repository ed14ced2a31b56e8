# libmoe build. `make` builds build/libmoe.a, build/libmoe.so and build/moe;
# `make demo` runs the main job; `make test` runs every test.
# Missing system packages are installed by tools/deps.sh (as root with
# apt-get) or it stops with the exact command to run.

CC       ?= cc
# The OpenMP build of OpenBLAS, chosen deliberately: its threads are the same
# OpenMP team as ours, so BLAS calls inside our parallel regions do not
# oversubscribe the cores (see README, "C API").
BLAS_INC ?= /usr/include/x86_64-linux-gnu/openblas-openmp
BLAS_LIB ?= /usr/lib/x86_64-linux-gnu/openblas-openmp
OPT      ?= -O2 -march=native
SAN      ?=
BUILD    ?= build

CFLAGS  = $(OPT) -g -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter \
          -fPIC -fopenmp -Iinclude -Isrc/core -Isrc/ops -Isrc/layers -I$(BLAS_INC) $(SAN)
LDFLAGS = -fopenmp $(SAN) -L$(BLAS_LIB) -Wl,-rpath,$(BLAS_LIB)
LDLIBS  = -lopenblas -lcjson -lm

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

LIB_SRC  = $(filter-out src/dist/%,$(sort $(wildcard src/*/*.c)))
LIB_OBJ  = $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
DIST_SRC = $(sort $(wildcard src/dist/*.c))
DIST_OBJ = $(DIST_SRC:%.c=$(BUILD)/obj/%.o)
CLI_SRC  = $(filter-out tools/moe/ep_%.c,$(sort $(wildcard tools/moe/*.c))) $(CLI_EP)
CLI_OBJ  = $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TEST_SRC = $(sort $(wildcard tests/test_*.c))
TEST_BIN = $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC = $(sort $(wildcard bench/*.c))
BENCH_BIN = $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
HDRS     = include/moe.h include/moe_mpi.h $(wildcard src/*/*.h) $(wildcard tools/moe/*.h)

.PHONY: all build-all deps deps-test deps-fuzz demo test test-c test-mpi-bins test-asan test-valgrind bench fuzz clean

# deps first, then a fresh make that sees what deps installed (mpicc)
all: deps
	@$(MAKE) --no-print-directory build-all

build-all: $(BUILD)/libmoe.a $(BUILD)/libmoe.so $(BUILD)/moe $(MPI_LIB)

deps:
	@sh tools/deps.sh build

deps-test:
	@sh tools/deps.sh test

deps-fuzz:
	@sh tools/deps.sh build
	@sh tools/deps.sh fuzz

$(BUILD)/obj/%.o: %.c $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libmoe.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDFLAGS) $(LDLIBS)

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

$(BUILD)/tests/%: tests/%.c tests/check.h $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoe.a $(LDFLAGS) $(LDLIBS)

# The main job: train the MoE character language model on the built-in corpus.
demo: all
	./$(BUILD)/moe train

test-c: all $(TEST_BIN) $(MPI_TEST_BIN)

# Every test: C unit/gradient/bad-input tests, CLI tests, PyTorch parity, and
# the C tests again under ASan + UBSan. Ends with "N passed, N failed".
test: deps-test all $(TEST_BIN) $(BENCH_BIN)
	@$(MAKE) --no-print-directory test-mpi-bins
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test-c
	@sh tests/run.sh

test-asan:
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test-c
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
	for t in 1 2; do ./$(BUILD)/moe bench --threads $$t; ./$(BUILD)/moe bench --layer gshard --threads $$t; done
	/usr/bin/python3 bench/torch_bench.py --table

# The C tests under valgrind memcheck (errors and definite leaks fail), built
# without -march=native (valgrind has no AVX-512). test_gradcheck and
# test_faults take many minutes there; they run under ASan in `make test`.
VALGRIND_TESTS = test_badinput test_corpus test_gshard test_layers test_lm test_numerics test_router test_safetensors test_soft
test-valgrind:
	@sh tools/deps.sh valgrind
	@$(MAKE) --no-print-directory BUILD=build-vg OPT=-O1 test-c
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
             -D_GNU_SOURCE -Wno-unknown-pragmas -Iinclude -Isrc/core -Isrc/ops -Isrc/layers -I$(BLAS_INC)
build-fuzz/fuzz_%: fuzz/fuzz_%.c $(LIB_SRC) $(HDRS) | deps-fuzz
	@mkdir -p build-fuzz
	clang $(FUZZ_FLAGS) $< $(LIB_SRC) $(if $(filter %forward,$*),tools/moe/forward.c tools/moe/forward_ep.c tools/moe/ep_none.c tools/moe/cli.c) \
	    -o $@ -L$(BLAS_LIB) -Wl,-rpath,$(BLAS_LIB) -lopenblas -lcjson -lm

fuzz: $(FUZZ_TARGETS:%=build-fuzz/fuzz_%)
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p build-fuzz/corpus_$$t; \
	    ./build-fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -close_fd_mask=3 -rss_limit_mb=4096 \
	        -artifact_prefix=build-fuzz/crash_$$t- build-fuzz/corpus_$$t fuzz/corpus/$$t \
	        >build-fuzz/$$t.log 2>&1 || { tail -n 40 build-fuzz/$$t.log; exit 1; }; \
	    echo "fuzz $$t: $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' build-fuzz/$$t.log), no crash"; \
	done

clean:
	rm -rf build build-asan build-fuzz build-vg
