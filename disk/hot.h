// KVBLK_HOT marks the functions a cached read runs from request to
// completion (the fio engine's queue/commit/getevents, the event loop's
// pass, the fast read, the cache lookup, the image lock, the io_uring
// submit and reap).
//
// Why: on a machine whose kernel flushes the TLB at every system call
// (page-table isolation without PCID), each distinct page a read touches
// after io_uring_enter costs a page walk. Spread over the library's text,
// these functions sat on a dozen code pages; GCC puts `hot` functions in
// .text.hot and the linker gathers every object's .text.hot together, so
// they share three. docs/disk-layer.md has the measurements, and
// perf/read_pages.sh counts the pages a read touches.
//
// Mark only what every read runs; a function marked by mistake costs
// nothing but a slot in those pages.
#ifndef KVBLK_DISK_HOT_H_
#define KVBLK_DISK_HOT_H_

#define KVBLK_HOT __attribute__((hot))

#endif  // KVBLK_DISK_HOT_H_
