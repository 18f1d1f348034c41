"""Build of projkernels: the pure-Python package, plus the C++/CUDA extension where it can be built.

The extension ``projkernels._C`` registers the ``projkernels_C::`` ops: their schemas and public ops
(csrc/ops/), CPU kernels (csrc/cpu/), autograd (csrc/autograd/) and Python bindings (csrc/python/),
with the shared headers of csrc/include/; and the CUDA kernels of csrc/cuda/ when nvcc and a CUDA
build of torch are there.
Environment switches:

    PROJKERNELS_NO_EXT=1   pure-Python package only (reference backend, Triton if installed)
    PROJKERNELS_CUDA=0     CPU extension only, even where CUDA could be built
    PROJKERNELS_CUDA=1     CUDA extension or fail (no silent fallback), with or without a GPU
    (unset)                CUDA kernels only when a GPU is visible at build time (torch sees one, or
                           nvidia-smi lists one): compiling them takes minutes, and a machine
                           without a GPU could not run them anyway
    TORCH_CUDA_ARCH_LIST   GPU architectures, "8.0;9.0+PTX" when unset (PTX: newer GPUs JIT it)
    MAX_JOBS               parallel compile jobs (torch's ninja build)

Without torch or a C++ compiler at build time (and PROJKERNELS_CUDA != 1) the pure-Python package
is installed with a warning; so is it when the extension fails to compile.  Install with
``CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ".[test]"`` (torch must be
importable by the build, hence no build isolation).
"""
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The version, written once: ``__version__`` in projkernels/__init__.py (read as text, since
    importing the package would need the extension this build makes)."""
    with open(os.path.join(HERE, "projkernels", "__init__.py"), encoding="utf-8") as fh:
        m = re.search(r'^__version__ = "([^"]+)"', fh.read(), flags=re.M)
    if m is None:
        raise RuntimeError("projkernels/__init__.py: no line __version__ = \"...\"")
    return m.group(1)


NAME = "projkernels._C"
# csrc/ by role (docs/design.md, "csrc by role"): the schemas of every op and the public ops' thin
# kernels; the CPU kernels; the autograd; the Python module with the eager API's bound calls.  The
# headers (csrc/include/) hold the math that the CPU and CUDA kernels share.
CPP_SOURCES = [
    "ops/schemas.cpp", "ops/public_ops.cpp",
    "cpu/orbit_kernels.cpp", "cpu/decay_kernels.cpp", "cpu/steerable_kernels.cpp",
    "autograd/autograd.cpp",
    "python/python_calls.cpp",
]
CUDA_SOURCES = ["cuda/orbit_kernels.cu", "cuda/multi_kernels.cu", "cuda/decay_kernels.cu", "cuda/steerable_kernels.cu"]
INCLUDE_DIRS = [os.path.join(HERE, "csrc", "include")]


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _skip(reason: str, forced: bool):
    if forced:
        raise RuntimeError(f"PROJKERNELS_CUDA=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(f"projkernels: building without the C++ extension ({reason}); "
                  "only the reference (and Triton) backends will be available")
    return [], {}


def _gpu_visible(torch) -> bool:
    """Whether this machine has a GPU to run CUDA kernels on: torch sees one, or nvidia-smi lists one
    (a driver older than torch's CUDA hides the GPU from torch, yet the kernels are worth building)."""
    try:
        if torch.cuda.is_available():
            return True
    except Exception:  # a broken driver install: fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _extensions():
    """(ext_modules, cmdclass) for this environment."""
    if _env("PROJKERNELS_NO_EXT") == "1":
        return [], {}
    cuda_switch = _env("PROJKERNELS_CUDA")
    if cuda_switch not in ("", "0", "1"):
        raise RuntimeError(f"PROJKERNELS_CUDA must be 0, 1 or unset, got {cuda_switch!r}")
    forced = cuda_switch == "1"
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") \
            and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch would otherwise derive the toolkit root from `which nvcc`, which may be a symlink elsewhere.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return _skip(f"torch is not importable at build time ({exc}); use pip install --no-build-isolation",
                     forced)
    cxx = (os.environ.get("CXX") or "c++").split()[0]
    if shutil.which(cxx) is None:
        return _skip(f"no C++ compiler ({cxx!r} not found)", forced)

    cuda_reason = None
    if cuda_switch == "0":
        cuda_reason = "PROJKERNELS_CUDA=0"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        cuda_reason = "nvcc / CUDA_HOME not found"
    elif not forced and not _gpu_visible(torch):
        cuda_reason = ("no GPU visible at build time; set PROJKERNELS_CUDA=1 to compile the CUDA kernels "
                       "anyway (several minutes)")
    if forced and cuda_reason is not None:
        raise RuntimeError(f"PROJKERNELS_CUDA=1 but the CUDA extension cannot be built: {cuda_reason}")

    csrc = os.path.join("csrc")
    macros = []
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp in *this* compile its OpenMP branch is
        # left out and every CPU kernel runs on one thread, whatever torch.set_num_threads says.  The
        # OpenMP runtime is torch's own libgomp.so.1 (already loaded by libtorch_cpu, same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    def cpu_extension():
        return cpp_extension.CppExtension(
            NAME,
            sources=[os.path.join(csrc, f) for f in CPP_SOURCES],
            include_dirs=INCLUDE_DIRS,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    if cuda_reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            NAME,
            sources=[os.path.join(csrc, f) for f in CPP_SOURCES + CUDA_SOURCES],
            include_dirs=INCLUDE_DIRS,
            define_macros=macros + [("PROJKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        print(f"projkernels: building the CPU extension only ({cuda_reason})", file=sys.stderr)
        ext = cpu_extension()

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed CUDA build falls back to the CPU extension, a failed CPU build to the pure-Python
        package; with PROJKERNELS_CUDA=1 any failure is an error."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as exc:  # compiler and linker errors come in several types
                if forced:
                    raise
                error = exc
            if cuda_reason is None:
                warnings.warn(f"projkernels: the CUDA extension failed to build ({error}); "
                              "building the CPU extension only")
                cpu = cpu_extension()
                # setuptools' finalize_options stored per-extension state (_full_name, _needs_stub, ...).
                for key, value in vars(self.extensions[0]).items():
                    if key.startswith("_"):
                        setattr(cpu, key, value)
                self.extensions = [cpu]
                try:
                    super().build_extensions()
                    return
                except Exception as exc:
                    error = exc
            warnings.warn(f"projkernels: the C++ extension failed to build ({error}); "
                          "installing the pure-Python package")
            self.extensions = []

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="projkernels",
    version=_version(),
    description="Exact projection penalty ||W - P(W)||^2 for approximately equivariant networks",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="projkernels contributors",
    license="BSD-3-Clause",
    license_files=["LICENSE", "NOTICE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["projkernels", "projkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "demo": ["matplotlib"],  # the demo's figure; without it the demo still prints and saves its results
        # python -m projkernels.bench_smoke: PhiFlow simulates the smoke plumes, matplotlib draws the figure
        "smoke": ["phiflow>=3.4", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "ninja", "matplotlib", "triton"],
        "triton": ["triton"],
        "escnn": ["escnn"],
        "lightning": ["lightning"],  # projkernels.integrations.lightning
        "tensorboard": ["tensorboard"],  # projkernels.integrations.tensorboard (torch's SummaryWriter needs it)
        "docs": ["mkdocs", "mkdocstrings[python]"],  # the documentation site (mkdocs build --strict)
        # CI: the integrations' tests, the docs build and the source archive
        "dev": ["lightning", "tensorboard", "mkdocs", "mkdocstrings[python]", "build", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
