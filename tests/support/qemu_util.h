// Helpers for tests that use QEMU's tools (qemu-img, qemu-io) as the
// reference implementation of qcow2: running them, judging images with
// `qemu-img check` / `qemu-img compare`, and reading whole devices.
#ifndef KVBLK_TESTS_SUPPORT_QEMU_UTIL_H_
#define KVBLK_TESTS_SUPPORT_QEMU_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/status.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {

// Quotes `s` for /bin/sh.
std::string ShellQuote(const std::string& s);

// Runs `cmd`; an exit code other than 0 is a test failure (reported with the
// command's output). Returns the result either way.
CommandResult ShOk(const std::string& cmd);

// Reads the whole device in chunks of `chunk` bytes (the last one shorter),
// each through a three-piece iovec so scatter reads are exercised too.
Result<std::vector<uint8_t>> ReadWholeDevice(BlockDevice& dev, size_t chunk);

// Reads bytes [offset, offset + len) of a device.
Result<std::vector<uint8_t>> ReadRange(BlockDevice& dev, uint64_t offset, size_t len);

// `qemu-img check` passes with "No errors were found" and reports no leaks.
void ExpectQemuCheckClean(const std::string& image);

// `qemu-img compare -f qcow2 -F raw image raw` reports identical contents.
void ExpectQemuCompareEqual(const std::string& image, const std::string& raw);

// Whether `qemu-img map` shows compressed clusters in `image` (it reports
// them as data without a host offset).
bool HasCompressedClusters(const std::string& image);

// Writes `bytes` to `path` (replacing it); a failure is a test failure.
void WriteFileBytes(const std::string& path, const std::vector<uint8_t>& bytes);

// Index of the first byte where `a` and `b` differ, or -1 if they are equal
// (a length difference counts as a difference at the shorter length).
int64_t FirstDifference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b);

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_QEMU_UTIL_H_
