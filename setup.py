"""Build script. Two optional extensions:

* ``bivlm_kernels._C`` (CUDA, ``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp``): built only when asked for or when a CUDA
  toolchain and a CUDA build of torch are both present;
* ``bivlm_kernels._C_cpu`` (C++ CPU kernels, ``csrc/cpu/*.cpp``, g++/clang with OpenMP): built on every install
  where torch is importable at build time, with or without CUDA.

Without them the pure-Python package installs (and runs the reference kernels).

Environment switches:
  BIVLM_BUILD_CUDA=auto|0|1   auto (default): build if possible; 0: never; 1: build or fail
  BIVLM_BUILD_CPU=auto|0|1    same for the CPU extension (auto: a failed compile does not fail the install)
  TORCH_CUDA_ARCH_LIST        e.g. "8.0;9.0" (default), "9.0+PTX"
  MAX_JOBS                    parallel nvcc jobs (torch's ninja builder)

torch must be importable at build time for the extension, so install with
``pip install --no-build-isolation -e .`` (plain ``pip install .`` builds in isolation and gets the
pure-Python package).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _set_cuda_home():
    """torch guesses CUDA_HOME from the directory of `nvcc` on PATH, which is wrong when that `nvcc` is a
    wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc). Pick the first candidate
    that really holds a toolkit (bin/nvcc and include/cuda_runtime.h), unless the user set CUDA_HOME."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = c
            return


def cuda_extensions():
    mode = os.environ.get("BIVLM_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BIVLM_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}

    def unavailable(why):
        if mode == "1":
            raise SystemExit(f"BIVLM_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"bivlm_kernels: not building the CUDA extension ({why}); installing the pure-Python package")
        return [], {}

    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return unavailable("torch is not importable at build time (use --no-build-isolation)")
    if torch.version.cuda is None:
        return unavailable(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return unavailable("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not sources:
        return unavailable("csrc/cuda/ holds no sources")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "bivlm_kernels._C", sources,
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],  # recent torch ATen headers require C++20
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    # In auto mode a failed compile must not fail the install: setuptools skips an optional extension with a
    # warning, and the package then runs on Triton / the reference.
    ext.optional = mode == "auto"
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cpu_extensions():
    """The CPU kernels: plain C++ (kernels_*.cpp, AVX2 chosen at run time) + one torch registration file."""
    mode = os.environ.get("BIVLM_BUILD_CPU", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BIVLM_BUILD_CPU must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if mode == "1":
            raise SystemExit("BIVLM_BUILD_CPU=1 but torch is not importable at build time "
                             "(use pip install --no-build-isolation)")
        print("bivlm_kernels: not building the CPU extension (torch is not importable at build time; "
              "use --no-build-isolation); CPU tensors use the reference kernels")
        return [], {}
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; the extension then shares torch's
    # libgomp (same soname). No -march: the AVX2 file selects its ISA by pragma and is called after a CPUID check.
    ext = CppExtension("bivlm_kernels._C_cpu", sources, include_dirs=[os.path.join(HERE, "csrc", "cpu")],
                       extra_compile_args=["-O3", "-std=c++20", "-fopenmp"], extra_link_args=["-fopenmp"])
    ext.optional = mode == "auto"
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def build_ext_command():
    """torch's BuildExtension (ninja), made tolerant for optional extensions: setuptools skips an optional
    extension only on a compile error, but torch checks the compiler (``c++ --version``) before compiling and
    raises anything. In auto mode neither failure may fail the install: the package then runs without it."""
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 -- any failure of an all-optional build is reported and skipped
                if not all(getattr(x, "optional", False) for x in self.extensions):
                    raise
                print(f"bivlm_kernels: building the compiled extensions failed ({type(e).__name__}: {e}); "
                      f"installing without them (set BIVLM_BUILD_CPU=1 / BIVLM_BUILD_CUDA=1 to make this an error)")

    return OptionalBuildExtension


cuda_ext, _ = cuda_extensions()
cpu_ext, _ = cpu_extensions()
ext_modules = cuda_ext + cpu_ext
cmdclass = {"build_ext": build_ext_command()} if ext_modules else {}

setup(
    name="bivlm_kernels",
    version="0.1.0",
    description="Packed 1/2/4-bit weights, CUDA/Triton kernels, drop-in layers and a Bi-VLM/LUQ quantizer for VLMs",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bivlm_kernels", "bivlm_kernels.*"]),
    package_data={"bivlm_kernels": ["data/*", "data/**/*", "models/data/*"]},
    # Lower bounds are the oldest releases the test suite ran green with (constraints.txt pins the newest
    # green set): transformers 5.23 and 5.24 both pass; 4.x builds the model configs differently (rope_parameters)
    # and is not tested. No upper bounds: no known break. Older torch/safetensors/triton may work but are untested.
    install_requires=["torch>=2.14", "numpy", "safetensors>=0.8"],
    extras_require={
        "triton": ["triton>=3.8"],
        "quant": ["transformers>=5.23", "accelerate", "tqdm", "scikit-learn"],
        "testbed": ["transformers>=5.23", "accelerate", "gguf", "onnx", "pillow", "tqdm", "scikit-learn"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["bivlm = bivlm_kernels.cli:main"],
                  # vLLM calls this at start-up: registers quant_method "bivlm" (bivlm_kernels/integrations/vllm_plugin.py)
                  "vllm.general_plugins": ["bivlm = bivlm_kernels.integrations.vllm_plugin:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
