"""Build script: both packages always; the CUDA extension only where it can be built.

The extension ``sensilora_kernels._C`` needs a CUDA build of torch and nvcc. ``SENSILORA_BUILD_CUDA=1``
makes a missing toolchain an error, ``SENSILORA_BUILD_CUDA=0`` skips the extension; unset, it is
built when possible and skipped with a warning otherwise. Build it with
``pip install --no-deps --no-build-isolation -e .`` so that the build sees the installed torch.
"""

import os
import warnings

from setuptools import find_packages, setup

CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/column_sumsq.cu", "csrc/radix_select.cu"]
MIN_CAPABILITY = (8, 0)  # __reduce_add_sync (csrc/radix_select.cu)


def cuda_build():
    """Return (ext_modules, cmdclass) for the CUDA extension, or empty ones with a warning."""
    flag = os.environ.get("SENSILORA_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            reason = "nvcc / CUDA_HOME was not found"
        elif torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY:
            reason = f"the GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}; the kernels need sm_80+"
        elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # no GPU to build for: torch would compile for every architecture it knows, older ones included,
            # where the selection's warp reductions (__reduce_add_sync) do not exist
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    if reason is not None:
        message = f"sensilora: not building the CUDA extension: {reason}; Triton/torch backends remain."
        if flag == "1":
            raise SystemExit(message + " (SENSILORA_BUILD_CUDA=1 asked for it)")
        warnings.warn(message)
        return [], {}
    extension = CUDAExtension(
        "sensilora_kernels._C",
        sources=CUDA_SOURCES,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_build()

setup(
    # every subpackage (calibration/observers, allocation, integrations, cli, ops; the Triton backend's folder)
    packages=[f"sensilora.{p}" for p in find_packages("python/sensilora")] + ["sensilora"]
    + [f"sensilora_kernels.{p}" for p in find_packages("sensilora_kernels")] + ["sensilora_kernels"],
    package_dir={"sensilora": "python/sensilora", "sensilora_kernels": "sensilora_kernels"},
    package_data={"sensilora": ["METHOD.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
