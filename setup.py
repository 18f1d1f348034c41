"""Build of projkernels: the pure-Python package, plus the C++/CUDA extension where it can be built."""
from setuptools import find_packages, setup

setup(
    name="projkernels",
    version="0.1.0",
    description="Exact projection penalty ||W - P(W)||^2 for approximately equivariant networks",
    packages=find_packages(include=["projkernels", "projkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ninja", "matplotlib"],
        "triton": ["triton"],
        "escnn": ["escnn"],
    },
)
