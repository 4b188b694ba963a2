"""Compile `csrc/*.cpp` into `_build/deepflow_kernels.so` (run by `make kernels`; ~1 minute on 2 cores).

Every source registers its ops with `TORCH_LIBRARY_FRAGMENT(deepflow, m)`, so adding a kernel is adding a
file. The library links against the torch in this environment only (no pybind module): it is loaded with
`torch.ops.load_library`, and the ops run on torch's own OpenMP team (`at::parallel_for`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
BUILD = HERE / "_build"
NAME = "deepflow_kernels"

CFLAGS = [
    "-O3",
    "-march=native",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    "-fopenmp",
    "-ffp-contract=off",
    "-DNDEBUG",
    "-std=c++17",
]


def build(verbose: bool = False) -> Path:
    from torch.utils import cpp_extension

    BUILD.mkdir(exist_ok=True)
    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise SystemExit(f"no sources in {CSRC}")
    cpp_extension.load(
        name=NAME,
        sources=sources,
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC)],
        build_directory=str(BUILD),
        is_python_module=False,
        verbose=verbose,
    )
    built = BUILD / f"{NAME}.so"
    if not built.exists():
        raise SystemExit(f"build finished without {built}")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clean", action="store_true", help="remove the build folder first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(BUILD, ignore_errors=True)
    print(f"built {build(args.verbose)}", file=sys.stderr)


if __name__ == "__main__":
    main()
