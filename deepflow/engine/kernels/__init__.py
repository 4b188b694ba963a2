"""FlowServe's own CPU kernels (AVX-512 + AVX512-BF16), registered as custom ops in `torch.ops.deepflow`.

The C++ sources in `csrc/` are compiled once at install (`make kernels`, run by `make install`) into
`_build/deepflow_kernels.so`; nothing is compiled when an engine starts. `load()` loads that library when the
CPU has the instructions and `DEEPFLOW_KERNELS` is not `0`; otherwise callers take the pure-torch path, which
is also what every kernel is tested against (tests/engine/kernels/).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILD_DIR = Path(__file__).parent / "_build"
LIBRARY = BUILD_DIR / "deepflow_kernels.so"
# The CPU flags every kernel needs (as /proc/cpuinfo spells them).
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# Must equal csrc/version.cpp's abi_version(): a library built from older sources is refused, not half-used.
ABI_VERSION = 1


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def disabled_by_env() -> bool:
    return os.environ.get("DEEPFLOW_KERNELS", "1").strip().lower() in ("0", "false", "off", "no")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None when they can (the library still has to load)."""
    if disabled_by_env():
        return "disabled by DEEPFLOW_KERNELS=0"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (run `make kernels`)"
    return None


@functools.cache
def load() -> bool:
    """Load the kernel library once; True when `torch.ops.deepflow` ops are usable in this process."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("deepflow kernels off: %s; using the torch path", reason)
        return False
    torch.ops.load_library(str(LIBRARY))
    built = torch.ops.deepflow.abi_version()
    if built != ABI_VERSION:
        raise RuntimeError(
            f"{LIBRARY} has ABI {built}, this code expects {ABI_VERSION}: run `make kernels` to rebuild it"
        )
    return True


def available(*ops: str) -> bool:
    """True when the library is loaded and has every op named (`torch.ops.deepflow.<op>`)."""
    return load() and all(hasattr(torch.ops.deepflow, op) for op in ops)
