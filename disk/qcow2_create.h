// Creating qcow2 images (the empty layout), used by CreateImage().
#ifndef KVBLK_DISK_QCOW2_CREATE_H_
#define KVBLK_DISK_QCOW2_CREATE_H_

#include <string>

#include "kvblk/image_create.h"

namespace kvblk {

// Writes an empty qcow2 image to `path`: header (+ extensions), one refcount
// table cluster, one refcount block, and a zeroed L1 table sized for
// opts.size. The refcount block accounts for every cluster written.
Status CreateQcow2(const std::string& path, const CreateOptions& opts);

// Allocates every cluster of an existing, empty qcow2 image: L2 tables only
// (metadata) or L2 tables and data clusters (falloc/full). Implemented by the
// qcow2 device.
Status Qcow2Preallocate(const std::string& path, Preallocation mode);

}  // namespace kvblk

#endif  // KVBLK_DISK_QCOW2_CREATE_H_
