# The OverlapGuard benchmark (perf/overlap_guard_bench.cc), a plain program.
# Run from the top of the tree:
#   make -f perf/overlap_guard.mk [BUILD=build-og]   builds $(BUILD)/perf/overlap_guard_bench
# perf/overlap_guard_bench.sh builds it and writes perf/results/overlap_guard.md.
# It compiles the two library files it needs itself, so it does not wait for
# the rest of libkvblk.a.

BUILD ?= build
CXX   ?= g++
OPT   ?= -O2
OG_CXXFLAGS := -std=c++20 $(OPT) -g -Wall -Wextra -Werror -pthread -Iinclude -I. -MMD -MP
OG_OBJ  := $(BUILD)/perf/og-obj
OG_SRCS := perf/overlap_guard_bench.cc disk/overlap_guard.cc disk/status.cc
OG_OBJS := $(OG_SRCS:%.cc=$(OG_OBJ)/%.o)
OG_BIN  := $(BUILD)/perf/overlap_guard_bench

.PHONY: overlap-guard-bench
overlap-guard-bench: $(OG_BIN)

$(OG_OBJ)/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(OG_CXXFLAGS) -c $< -o $@

$(OG_BIN): $(OG_OBJS)
	$(CXX) -pthread -o $@ $^

-include $(OG_OBJS:.o=.d)
