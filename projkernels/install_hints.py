"""Commands that install what an error says is missing, for the way projkernels was installed.

projkernels is installed from its source tree (``pip install --no-build-isolation -e .`` in a checkout,
or from the source archive); it is on no package index, so a hint such as ``pip install
projkernels[escnn]`` could not work.  Optional packages that are on an index are named directly.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["source_tree", "escnn_hint", "extension_hint"]


def source_tree() -> Optional[str]:
    """The source checkout this package runs from (an editable install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def escnn_hint() -> str:
    return ("pip install escnn (its dependency py3nj builds from source: on Debian/Ubuntu first "
            "apt-get install gfortran and pip install meson-python numpy, then pip install --no-build-isolation "
            "escnn)")


def extension_hint(cuda: bool = False) -> str:
    """How to rebuild the C++ (``cuda=True``: and CUDA) extension."""
    env = "PROJKERNELS_CUDA=1 CUDA_HOME=/usr/local/cuda " if cuda else ""
    root = source_tree()
    where = f"cd {root} && " if root is not None else "from the projkernels source tree: "
    return f"{where}{env}pip install --no-build-isolation -e ."
