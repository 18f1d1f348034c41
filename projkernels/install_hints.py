"""Commands that install what an error says is missing, for the way projkernels was installed.

projkernels is installed from its source: either a checkout (``pip install --no-build-isolation -e .``,
an editable install: the package runs from the checkout) or the source archive that ``python -m build
--sdist`` makes (``pip install --no-build-isolation projkernels-<version>.tar.gz``: the package runs from
site-packages, with no source tree next to it).  It is on no package index, so a hint such as ``pip
install projkernels[escnn]`` could not work; each hint names a command for the install at hand.  Optional
packages that are on an index are named directly.
"""
from __future__ import annotations

import os
import shlex
from typing import Optional, Sequence

__all__ = ["source_tree", "install_kind", "escnn_hint", "extension_hint", "extra_hint"]


def source_tree() -> Optional[str]:
    """The source checkout this package runs from (an editable install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def install_kind() -> str:
    """``"checkout"`` when the package runs from its source tree (editable install, or PYTHONPATH on a
    checkout), ``"archive"`` when it was installed into site-packages from the source archive."""
    return "checkout" if source_tree() is not None else "archive"


def _version() -> str:
    # Read lazily: this module is imported while projkernels/__init__.py is still running.
    import projkernels
    return getattr(projkernels, "__version__", "<version>")


def _archive_install(env: str = "") -> str:
    return (f"{env}pip install --no-build-isolation --force-reinstall --no-deps "
            f"projkernels-{_version()}.tar.gz (the source archive this package was installed from)")


def escnn_hint() -> str:
    return ("pip install escnn (its dependency py3nj builds from source: on Debian/Ubuntu first "
            "apt-get install gfortran and pip install meson-python numpy, then pip install --no-build-isolation "
            "escnn)")


def extension_hint(cuda: bool = False) -> str:
    """How to rebuild the C++ (``cuda=True``: and CUDA) extension, for the way the package was installed."""
    env = "PROJKERNELS_CUDA=1 CUDA_HOME=/usr/local/cuda " if cuda else ""
    root = source_tree()
    if root is None:
        # Installed from the archive: a rebuild is a reinstall from it (with a compiler and torch present).
        return _archive_install(env)
    return f"cd {root} && {env}pip install --no-build-isolation -e ."


def extra_hint(extra: str, packages: Sequence[str]) -> str:
    """How to install the optional ``packages`` that the ``extra`` of setup.py lists.

    From a checkout the extra itself installs them (so the versions setup.py asks for are kept); from
    the archive the packages are named directly (they are on PyPI), since projkernels is not."""
    root = source_tree()
    if root is None:
        # quoted: a bare "phiflow>=3.4" in a shell redirects pip's output to a file named "=3.4"
        return "pip install " + " ".join(shlex.quote(p) for p in packages)
    return f'cd {root} && pip install --no-build-isolation -e ".[{extra}]"'
