# kvblk build. `make` builds the release tree under build/; `make test`
# installs what is missing, builds, and runs every test; `make help` lists
# the rest.

BUILD    ?= build
CXX      ?= g++
PREFIX   ?= /usr/local
DESTDIR  ?=
SANITIZE ?=
OPT      ?= -O2

CXXFLAGS_BASE := -std=c++20 $(OPT) -g -Wall -Wextra -Werror -fPIC -pthread \
                 -Iinclude -I. -MMD -MP
ifneq ($(SANITIZE),)
CXXFLAGS_BASE += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
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

.PHONY: all deps test unit interop asan tsan install clean help format perf bench bench-quick demo guest stress

all: $(CLI) $(LIB_A) $(LIB_SO)

help:
	@echo "make            build build/kvblk, build/libkvblk.a, build/libkvblk.so"
	@echo "make deps       install the Debian packages kvblk needs (idempotent)"
	@echo "make demo       boot a Linux guest (QEMU, TCG) from a qcow2 disk served by kvblk serve, run fio"
	@echo "make test       deps + build + unit tests + interop tests against qemu-img/qemu-io + guest"
	@echo "make asan|tsan  the same tests on an AddressSanitizer/ThreadSanitizer build"
	@echo "make install    install into \$$DESTDIR\$$PREFIX (default /usr/local)"
	@echo "make stress     long runs: 10,000 power-cut states (seed random unless KVBLK_CRASH_SEED)"
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

unit: $(UNIT)
	$(UNIT)

# The whole suite: unit tests and the interop scripts, with one summary line.
test: deps
	@$(MAKE) --no-print-directory all $(UNIT)
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

stress: $(UNIT)
	KVBLK_CRASH_STATES=$${KVBLK_CRASH_STATES:-10000} KVBLK_CRASH_SEED=$${KVBLK_CRASH_SEED:-random} \
	  $(UNIT) --gtest_filter='Workloads/CrashSim.*'

asan:
	@$(MAKE) --no-print-directory test BUILD=build-asan SANITIZE=address,undefined OPT=-O1

tsan:
	@TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp $$TSAN_OPTIONS" \
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

format:
	clang-format -i $(LIB_SRCS) $(TOOL_SRCS) $(TEST_SRCS) disk/*.h virtio/*.h include/kvblk/*.h

clean:
	rm -rf build build-asan build-tsan

-include $(LIB_OBJS:.o=.d) $(TOOL_OBJS:.o=.d) $(TEST_OBJS:.o=.d)
