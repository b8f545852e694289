# kvblk build. `make` builds the release tree under build/; `make test`
# installs what is missing, builds, and runs every test; `make help` lists
# the rest.

BUILD    ?= build
CXX      ?= g++
PREFIX   ?= /usr/local
DESTDIR  ?=
SANITIZE ?=
OPT      ?= -O2

# -fno-plt: calls into shared libraries (liburing's submit on every read)
# go through the GOT directly, sparing a page of PLT stubs (disk/hot.h).
CXXFLAGS_BASE := -std=c++20 $(OPT) -g -Wall -Wextra -Werror -fPIC -pthread -fno-plt \
                 -Iinclude -I. -MMD -MP
ifneq ($(SANITIZE),)
# -Wno-tsan: the virtio ring code's fences are fine; TSAN just cannot model them.
CXXFLAGS_BASE += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -Wno-tsan
LDFLAGS_SAN   := -fsanitize=$(SANITIZE)
endif
CXXFLAGS += $(CXXFLAGS_BASE)
LDLIBS   := -luring -ltbb -lz -lzstd -pthread
LDFLAGS  += $(LDFLAGS_SAN)

LIB_SRCS   := $(wildcard disk/*.cc) $(wildcard virtio/*.cc)
TOOL_SRCS  := $(wildcard tools/*.cc)
TEST_SRCS  := $(wildcard tests/*/*_test.cc) $(wildcard tests/support/*.cc)
LIB_OBJS   := $(LIB_SRCS:%.cc=$(BUILD)/obj/%.o)
TOOL_OBJS  := $(TOOL_SRCS:%.cc=$(BUILD)/obj/%.o)
TEST_OBJS  := $(TEST_SRCS:%.cc=$(BUILD)/obj/%.o)

LIB_A   := $(BUILD)/libkvblk.a
LIB_SO  := $(BUILD)/libkvblk.so
CLI     := $(BUILD)/kvblk
UNIT    := $(BUILD)/tests/unit_tests
# The end-to-end live snapshot test's client (tests/interop/live_snapshot_test.sh).
LIVE_CLIENT := $(BUILD)/tests/live_client
LIVE_CLIENT_OBJS := $(BUILD)/obj/tests/interop/live_client.o $(BUILD)/obj/perf/fio/vhost_user_client.o

.PHONY: all deps test unit interop asan tsan install clean help format perf bench bench-quick demo guest stress
.PHONY: fuzz fuzz-build

all: $(CLI) $(LIB_A) $(LIB_SO)

help:
	@echo "make            build build/kvblk, build/libkvblk.a, build/libkvblk.so"
	@echo "make deps       install the Debian packages kvblk needs (idempotent)"
	@echo "make demo       boot a Linux guest (QEMU, TCG) from a qcow2 disk served by kvblk serve, run fio"
	@echo "make test       deps + build + unit tests + interop tests against qemu-img/qemu-io + guest"
	@echo "make asan|tsan  the same tests on an AddressSanitizer/ThreadSanitizer build"
	@echo "make install    install into \$$DESTDIR\$$PREFIX (default /usr/local)"
	@echo "make stress     long runs: 10,000 power-cut states (seed random unless KVBLK_CRASH_SEED),"
	@echo "                100 SIGKILLs of kvblk serve under fio (KVBLK_KILL_ROUNDS, KVBLK_KILL_SEED)"
	@echo "make fuzz       libFuzzer+ASan+UBSan targets in build-fuzz/, FUZZ_SECONDS (300) each"
	@echo "make perf       build the fio engines (build/perf/fio-kvblk.so, fio-vhost-user.so)"
	@echo "make bench      full fio matrix: raw vs kvblk vs qemu-storage-daemon (perf/results/)"
	@echo "make bench-quick  a reduced matrix in a few minutes"

deps:
	@tools/deps.sh

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(LIB_A): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIB_SO): $(LIB_OBJS)
	$(CXX) -shared -o $@ $^ $(LDFLAGS) $(LDLIBS)

$(CLI): $(TOOL_OBJS) $(LIB_A)
	$(CXX) -o $@ $(TOOL_OBJS) $(LIB_A) $(LDFLAGS) $(LDLIBS)

$(UNIT): $(TEST_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $(TEST_OBJS) $(LIB_A) $(LDFLAGS) -lgtest -lgmock -lgtest_main $(LDLIBS)

$(LIVE_CLIENT): $(LIVE_CLIENT_OBJS) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CXX) -o $@ $(LIVE_CLIENT_OBJS) $(LIB_A) $(LDFLAGS) $(LDLIBS)

unit: $(UNIT)
	$(UNIT)

# The whole suite: unit tests and the interop scripts, with one summary line.
test: deps
	@$(MAKE) --no-print-directory all $(UNIT) $(LIVE_CLIENT)
	@tests/run_all.sh $(BUILD)

# The main job: a real guest boots from a qcow2 root disk served by
# `kvblk serve` over vhost-user-blk and runs fio with verification on a
# second kvblk disk. KVBLK_GUEST_BACKEND=qsd runs the same guest on
# qemu-storage-daemon for comparison.
demo: deps
	@$(MAKE) --no-print-directory all
	@GUEST_CONSOLE=1 tests/guest/guest_test.sh $(BUILD)

guest: all
	@tests/guest/guest_test.sh $(BUILD)

stress: $(UNIT) all
	KVBLK_CRASH_STATES=$${KVBLK_CRASH_STATES:-10000} KVBLK_CRASH_SEED=$${KVBLK_CRASH_SEED:-random} \
	  $(UNIT) --gtest_filter='Workloads/CrashSim.*'
	KVBLK_KILL_ROUNDS=$${KVBLK_KILL_ROUNDS:-100} tests/interop/kill_test.sh $(BUILD)
	KVBLK_STRESS_OPS=$${KVBLK_STRESS_OPS:-2000000} $(UNIT) --gtest_filter='ConcurrencyStress.*'

# The vhost-user fio engine for the interop scripts comes from the plain
# build (fio cannot load one linked against the sanitized library without
# the sanitizer's runtime preloaded; fio_kvblk_test.sh does preload it for
# the disk-layer engine). UBSAN findings abort the test that hit them: by
# default they are printed and the test goes on, and run_all.sh shows only
# the end of the unit tests' output.
asan:
	@$(MAKE) --no-print-directory -f perf/Makefile BUILD=build build/perf/fio-vhost-user.so
	@KVBLK_FIO_ENGINE=$(CURDIR)/build/perf/fio-vhost-user.so \
	  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1 $$UBSAN_OPTIONS" \
	  $(MAKE) --no-print-directory test BUILD=build-asan SANITIZE=address,undefined OPT=-O1

# The concurrency stress test runs 8,000 operations under TSAN (its shadow
# memory for the default 80,000 outgrows this machine's 24 GiB).
tsan:
	@$(MAKE) --no-print-directory -f perf/Makefile BUILD=build build/perf/fio-vhost-user.so
	@KVBLK_STRESS_OPS=$${KVBLK_STRESS_OPS:-8000} \
	  KVBLK_FIO_ENGINE=$(CURDIR)/build/perf/fio-vhost-user.so \
	  TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp $$TSAN_OPTIONS" \
	  $(MAKE) --no-print-directory test BUILD=build-tsan SANITIZE=thread OPT=-O1

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib \
	           $(DESTDIR)$(PREFIX)/include/kvblk $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 $(CLI) $(DESTDIR)$(PREFIX)/bin/kvblk
	install -m 644 $(LIB_A) $(DESTDIR)$(PREFIX)/lib/
	install -m 755 $(LIB_SO) $(DESTDIR)$(PREFIX)/lib/
	install -m 644 include/kvblk/*.h $(DESTDIR)$(PREFIX)/include/kvblk/
	sed -e 's|@PREFIX@|$(PREFIX)|g' tools/kvblk.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/kvblk.pc

perf: $(LIB_A)
	@$(MAKE) --no-print-directory -f perf/Makefile BUILD=$(BUILD) perf

bench:
	@perf/bench.sh --build $(BUILD)

bench-quick:
	@perf/bench.sh --build $(BUILD) --quick

bench-qd:
	@perf/qd_scaling.sh --build $(BUILD)

format:
	clang-format -i $(LIB_SRCS) $(TOOL_SRCS) $(TEST_SRCS) disk/*.h virtio/*.h include/kvblk/*.h

clean:
	rm -rf build build-asan build-tsan build-fuzz

# ---- Fuzzing: libFuzzer with ASan+UBSan, clang, its own tree (build-fuzz/) ----
# The library is compiled with the sanitizers and fuzzer coverage
# (-fsanitize=fuzzer-no-link); only the fuzz targets link libFuzzer's main.
# `make fuzz` runs each target for FUZZ_SECONDS on a corpus in
# build-fuzz/corpus/<target>, seeded by tests/fuzz/make_seeds.sh; findings
# land in build-fuzz/findings/. tests/interop/fuzz_test.sh (in make test)
# runs each briefly and replays tests/fuzz/regressions/<target>/.
# -fno-sanitize=function: clang 14 cannot emit that check's prologue data for
# coroutine bodies together with coverage ("Cannot represent a difference
# across sections").
FUZZ_BUILD   := build-fuzz
FUZZ_CXX     ?= clang++
FUZZ_SECONDS ?= 300
FUZZ_CXXFLAGS := -std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
                 -fno-sanitize-recover=undefined -fno-sanitize=function -pthread -Iinclude -I. -MMD -MP -Wall
FUZZ_TARGETS := image_fuzz virtqueue_fuzz vhost_user_fuzz
FUZZ_LIB_OBJS := $(LIB_SRCS:%.cc=$(FUZZ_BUILD)/obj/%.o) \
                 $(FUZZ_BUILD)/obj/tests/support/virtio_fake_driver.o
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)

$(FUZZ_BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

# Objects are kept (not intermediate), so a rebuild compiles only what changed.
.SECONDARY: $(FUZZ_LIB_OBJS) $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/obj/tests/fuzz/%.o) \
            $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_util.o

$(FUZZ_BINS): $(FUZZ_BUILD)/%: $(FUZZ_BUILD)/obj/tests/fuzz/%.o \
              $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_util.o $(FUZZ_LIB_OBJS)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer -o $@ $^ $(LDLIBS)

fuzz-build: $(FUZZ_BINS)
	@tests/fuzz/make_seeds.sh $(FUZZ_BUILD)/seeds

fuzz: deps
	@$(MAKE) --no-print-directory fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/findings/$$t; \
	  echo "== $$t for $(FUZZ_SECONDS) s"; \
	  $(FUZZ_BUILD)/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_BUILD)/findings/$$t/ $$(cat tests/fuzz/$$t.options 2>/dev/null) \
	    $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/seeds/$$t 2>&1 | \
	    grep -E '^(#[0-9]+.*DONE|stat::|==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written)' || true; \
	done; \
	if find $(FUZZ_BUILD)/findings -type f | grep -q .; then \
	  echo "findings:"; find $(FUZZ_BUILD)/findings -type f; exit 1; fi

-include $(LIB_OBJS:.o=.d) $(TOOL_OBJS:.o=.d) $(TEST_OBJS:.o=.d) $(LIVE_CLIENT_OBJS:.o=.d)
-include $(wildcard $(FUZZ_BUILD)/obj/*/*.d $(FUZZ_BUILD)/obj/tests/*/*.d)
