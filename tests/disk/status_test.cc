// Status::ToErrno: the errno the C API and the fio engine report.
#include <cerrno>

#include <gtest/gtest.h>

#include "kvblk/status.h"

namespace kvblk {
namespace {

TEST(StatusToErrno, OkIsZero) { EXPECT_EQ(Status::Ok().ToErrno(), 0); }

TEST(StatusToErrno, EachCodeWithoutAnErrnoHasItsOwn) {
  EXPECT_EQ(Status::InvalidArgument("x").ToErrno(), EINVAL);
  EXPECT_EQ(Status::Corruption("x").ToErrno(), EINVAL);
  EXPECT_EQ(Status::NotSupported("x").ToErrno(), ENOTSUP);
  EXPECT_EQ(Status(StatusCode::kNoSpace, "out of memory").ToErrno(), ENOSPC);
  EXPECT_EQ(Status::NotFound("x").ToErrno(), ENOENT);
  EXPECT_EQ(Status::ReadOnly("x").ToErrno(), EROFS);
  EXPECT_EQ(Status::Busy("x").ToErrno(), EBUSY);
  EXPECT_EQ(Status(StatusCode::kIoError, "short read").ToErrno(), EIO);
}

// FromErrno folds several errnos into one code; the caller still gets the
// errno that happened, not the code's.
TEST(StatusToErrno, TheErrnoBehindTheFailureWins) {
  const Status denied = Status::FromErrno(EACCES, "open");
  EXPECT_EQ(denied.code(), StatusCode::kReadOnly);
  EXPECT_EQ(denied.ToErrno(), EACCES);
  const Status quota = Status::FromErrno(EDQUOT, "write");
  EXPECT_EQ(quota.code(), StatusCode::kNoSpace);
  EXPECT_EQ(quota.ToErrno(), EDQUOT);
  EXPECT_EQ(Status::FromErrno(EIO, "read").ToErrno(), EIO);
  EXPECT_EQ(Status::FromErrno(ENXIO, "read").WithContext("disk").ToErrno(), ENXIO);
}

}  // namespace
}  // namespace kvblk
