"""Build prong_ext: the Python package, its Triton kernels and the optional compiled extension `_C`.

Environment:
    PRONG_EXT_NO_EXTENSION=1   skip the compiled extension (pure torch/Triton package).
    PRONG_EXT_FORCE_CPU=1      build `_C` without CUDA even when torch and the toolkit have it.
    TORCH_CUDA_ARCH_LIST       CUDA architectures; "8.0;9.0" when unset and no GPU is visible.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("PRONG_EXT_NO_EXTENSION", "0") == "1":
        return [], {}
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
    cxx_flags = ["-O3", "-std=c++17"]
    define_macros = [("PRONG_EXT_WITH_CUDA", "1" if use_cuda else "0")]
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = cpp_extension.CUDAExtension(
            "prong_ext._C",
            sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "prong_ext._C", sources, define_macros=define_macros, extra_compile_args=cxx_flags
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="prong_ext",
    version="0.1.0",
    description="Natural Neural Networks (PRONG): whitened layers, fused Triton kernels, batched cuSOLVER eigh",
    packages=["prong_ext", "prong_ext.triton_kernels"],
    package_dir={"prong_ext": "prong_ext", "prong_ext.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "demo": ["matplotlib", "tqdm", "scikit-learn"]},
    entry_points={"console_scripts": ["prong-ext = prong_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
