"""pytest-benchmark configuration for ``pytest bench/``.

The benchmarks run only when bench/ (or a file in it) is named on the command line, so a bare
``pytest`` at the repository root or ``pytest tests/`` never collects them.  ``--large`` (or
PROJKERNELS_BENCH_LARGE=1) adds the >= 64 MB weight sets.
"""
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", default=False,
                     help="also benchmark the >= 64 MB weight sets (slow on CPU)")


def _named_explicitly(config) -> bool:
    for arg in config.args:
        path = os.path.abspath(arg.split("::")[0])
        if path == HERE or path.startswith(HERE + os.sep):
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if str(collection_path).startswith(HERE) and not _named_explicitly(config):
        return True
    return None


def pytest_configure(config):
    if config.getoption("--large", default=False):
        os.environ["PROJKERNELS_BENCH_LARGE"] = "1"
