"""Builds the C++/CUDA extension `src._C` from csrc/.

The CPU extension is always built. CUDA sources are added when a GPU is visible or FORCE_CUDA=1;
the toolkit root is found even when the `nvcc` on PATH is a wrapper script. Build with
`pip install --no-build-isolation -e .` (the build needs the installed torch)."""
import glob
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup


def find_cuda_home():
    """CUDA_HOME, else the toolkit root behind `nvcc` (following symlinks and `exec` wrappers)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    for _ in range(4):
        if nvcc is None:
            break
        real = Path(nvcc).resolve()
        root = real.parent.parent
        if (root / "lib64").exists() or (root / "lib").exists():
            if real.stat().st_size > 100_000:  # a real binary, not a script
                return str(root)
        try:
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            break
        found = re.search(r"(/\S+/bin/nvcc)\b", text)
        nvcc = found.group(1) if found else None
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if Path(root, "bin", "nvcc").exists():
            return root
    return None


def nvidia_wheel_includes():
    """Header folders of PyPI's nvidia-* wheels (installed with torch's CUDA build). A toolkit may
    lack the library headers torch's CUDA headers include (cusparse.h, cublas_v2.h, ...). They are
    searched *after* the toolkit's own (-idirafter): the wheels also carry runtime headers of
    their own CUDA version, which must not shadow the toolkit's."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({str(Path(d)) for root in roots for d in glob.glob(os.path.join(root, "*", "include"))})


def cpu_vector_flags():
    """AVX2 + FMA + F16C code for ATen's at::vec in our CPU kernels when the building x86 machine has both
    (the extension is built where it runs); VISOR_NO_AVX2=1 keeps the portable generic vectors."""
    if os.environ.get("VISOR_NO_AVX2") == "1" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return []
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extensions():
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/visor_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: torch's at::parallel_for is OpenMP-backed and inlined into our kernels; without the
    # flag its `#pragma omp parallel` is ignored and every CPU kernel runs on one thread.
    extra = {"cxx": ["-O3", "-fopenmp"] + cpu_vector_flags()}
    link = ["-fopenmp"]
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    if force_cuda or torch.cuda.is_available():
        cuda_home = find_cuda_home()
        if cuda_home is None:
            sys.exit("error: FORCE_CUDA=1 (or a visible GPU) but no CUDA toolkit found: set CUDA_HOME to the "
                     "toolkit root (the folder whose bin/ holds the real nvcc)")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            sys.exit("error: no GPU visible: set TORCH_CUDA_ARCH_LIST (for example '8.0;9.0') for a forced CUDA build")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        after = nvidia_wheel_includes()
        extra["cxx"] += [f for d in after for f in ("-idirafter", d)]
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"] + [f"-Xcompiler=-idirafter,{d}" for d in after]
        return [cpp_extension.CUDAExtension("src._C", sources, extra_compile_args=extra, extra_link_args=link)], cpp_extension
    return [cpp_extension.CppExtension("src._C", sources, extra_compile_args=extra, extra_link_args=link)], cpp_extension


ext_modules, cpp_extension = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})
