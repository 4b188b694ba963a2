// The library's ABI version: bumped whenever an op's schema changes, so a stale build is caught at load.
#include "common.h"

namespace deepflow {
static int64_t abi_version() { return 1; }
}  // namespace deepflow

TORCH_LIBRARY_FRAGMENT(deepflow, m) { m.def("abi_version() -> int", &deepflow::abi_version); }
