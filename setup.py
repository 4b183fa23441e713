"""Build prong_ext: the Python package, its Triton kernels and the optional compiled extension `_C`.

The metadata (name, version, dependencies, extras, scripts) is static, in pyproject.toml; this file
holds only what is computed at build time: the extension, its build command, the package folders.
The build of `_C` also writes prong_ext/_build_info.py beside it (torch version, CUDA version, arch
list it was compiled for), which prong_ext._extension reads without importing `_C`.

Environment:
    PRONG_EXT_NO_EXTENSION=1   skip the compiled extension (pure torch/Triton package).
    PRONG_EXT_FORCE_CPU=1      build `_C` without CUDA even when torch and the toolkit have it.
    TORCH_CUDA_ARCH_LIST       CUDA architectures; "8.0;9.0+PTX" when unset and no GPU is visible.
"""

import glob
import os

from setuptools import setup


def _cusolver_paths(torch_lib_dir, cuda_home):
    """(include dir, lib dir, library name) of cuSOLVER: the nvidia wheel next to torch, else CUDA_HOME."""
    site = os.path.dirname(os.path.dirname(torch_lib_dir))
    for sub in ("nvidia/cu13", "nvidia/cusolver"):  # CUDA 13 wheels, CUDA 12 wheels
        root = os.path.join(site, sub)
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcusolver.so.[0-9]*")), key=len)
        if os.path.exists(os.path.join(root, "include", "cusolverDn.h")) and libs:
            return os.path.join(root, "include"), os.path.join(root, "lib"), ":" + os.path.basename(libs[0])
    lib = next(
        (d for d in ("lib64", "lib") if glob.glob(os.path.join(cuda_home, d, "libcusolver.so*"))), "lib64"
    )
    return os.path.join(cuda_home, "include"), os.path.join(cuda_home, lib), "cusolver"


def _extensions():
    """(ext_modules, cmdclass, build variant); the variant names the build folder (build/<variant>)
    so that CPU and CUDA builds from one checkout keep apart."""
    if os.environ.get("PRONG_EXT_NO_EXTENSION", "0") == "1":
        return [], {}, "pure"
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    use_cuda = (
        os.environ.get("PRONG_EXT_FORCE_CPU", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx_flags = ["-O3"]  # no -std: torch adds the standard its headers need (C++20 for torch 2.14)
    define_macros = [("PRONG_EXT_WITH_CUDA", "1" if use_cuda else "0")]
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        site = os.path.dirname(os.path.dirname(torch_lib))
        solver_inc, solver_lib, solver_name = _cusolver_paths(torch_lib, cpp_extension.CUDA_HOME)
        # Host code only: torch's CUDA headers include cuSOLVER/cuBLAS/cuSPARSE, which a bare
        # toolkit may lack; -isystem keeps CUDA_HOME's own headers first.
        cxx_flags += ["-isystem", solver_inc]
        libraries = [solver_name]
        if os.path.exists(os.path.join(torch_lib, "libtorch_cuda_linalg.so")):
            libraries.append("torch_cuda_linalg")  # at::cuda::getCurrentCUDASolverDnHandle
        # Installed: prong_ext/_C.so sits beside torch/ and nvidia/ in site-packages; the absolute
        # paths serve in-place builds.
        rpaths = ["$ORIGIN/../torch/lib"]
        if solver_lib.startswith(site + os.sep):
            rpaths.append("$ORIGIN/../" + os.path.relpath(solver_lib, site))
        rpaths += [torch_lib, solver_lib]
        ext = cpp_extension.CUDAExtension(
            "prong_ext._C",
            sources + cuda_sources,
            define_macros=define_macros,
            library_dirs=[solver_lib, torch_lib],
            libraries=libraries,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=[f"-Wl,-rpath,{p}" for p in rpaths],
        )
    else:
        ext = cpp_extension.CppExtension(
            "prong_ext._C", sources, define_macros=define_macros, extra_compile_args=cxx_flags
        )
    build_info = {
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda if use_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
    }
    return [ext], {"build_ext": _build_ext_class(cpp_extension, build_info)}, "cuda" if use_cuda else "cpu"


def _build_ext_class(cpp_extension, build_info):
    """torch's BuildExtension (ninja) that also writes prong_ext/_build_info.py next to `_C`: in the
    build folder (what a wheel ships) and, for in-place and editable builds, in the source folder."""

    class BuildExtWithInfo(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            text = '"""Written by setup.py with prong_ext._C: what _C was compiled against."""\n\n' + "".join(
                f"{key} = {value!r}\n" for key, value in build_info.items()
            )
            folders = [os.path.join(self.build_lib, "prong_ext")]
            if self.inplace:
                folders.append(self.get_finalized_command("build_py").get_package_dir("prong_ext"))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_build_info.py"), "w") as f:
                    f.write(text)

    return BuildExtWithInfo


ext_modules, cmdclass, variant = _extensions()

setup(
    packages=["prong_ext", "prong_ext.experiments", "prong_ext.triton_kernels"],
    package_dir={"prong_ext": "prong_ext", "prong_ext.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": os.path.join("build", variant)}},
)
