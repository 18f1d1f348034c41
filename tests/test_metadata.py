"""The package's metadata agrees with itself: one version (``__version__``), which CITATION.cff and the
changelog name; the license in LICENSE, setup.py and CITATION.cff; the files a source archive must carry."""
import fnmatch
import os
import re

import projkernels as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
        return fh.read()


def test_the_version_is_written_once():
    setup_py = _read("setup.py")
    assert re.search(r"^\s*version=_version\(\),$", setup_py, flags=re.M), "setup.py takes the version from _version()"
    assert "__version__" in setup_py and pk.__version__ not in setup_py
    with open(pk.__file__, encoding="utf-8") as fh:  # the package imported (installed or in the tree)
        init_lines = [l for l in fh.read().splitlines() if l.startswith("__version__")]
    assert init_lines == [f'__version__ = "{pk.__version__}"']  # the line setup.py's regex reads


def test_citation_and_changelog_name_the_version():
    cff = _read("CITATION.cff")
    assert re.search(rf'^version: "?{re.escape(pk.__version__)}"?$', cff, flags=re.M), "CITATION.cff: version"
    released = re.search(rf"^## {re.escape(pk.__version__)} \((\d{{4}}-\d\d-\d\d)\)$", _read("CHANGELOG.md"),
                         flags=re.M)
    assert released, f"CHANGELOG.md: no heading for {pk.__version__}"
    assert re.search(rf'^date-released: "?{released.group(1)}"?$', cff, flags=re.M), \
        "CITATION.cff: date-released differs from the changelog's date for this version"


def test_license_is_bsd_3_clause_everywhere():
    assert _read("LICENSE").startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in _read("LICENSE")  # the third clause
    setup_py = _read("setup.py")
    assert 'license="BSD-3-Clause"' in setup_py and 'license_files=["LICENSE", "NOTICE"]' in setup_py
    assert re.search(r"^license: BSD-3-Clause$", _read("CITATION.cff"), flags=re.M)
    assert "arXiv:2601.05028" in _read("NOTICE") and "arXiv:2601.05028" in _read("CITATION.cff")


def test_the_source_archive_lists_what_an_install_needs():
    manifest = _read("MANIFEST.in")
    for name in ("LICENSE", "NOTICE", "CITATION.cff", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py"):
        assert re.search(rf"^include .*\b{re.escape(name)}\b", manifest, flags=re.M), f"MANIFEST.in: {name}"
    for pattern in ("recursive-include csrc *.h *.cuh *.cu *.cpp", "recursive-include tests", "recursive-include docs"):
        assert pattern in manifest, f"MANIFEST.in: {pattern}"


def test_the_source_archive_carries_the_docs_build():
    # mkdocs.yml names its hook files; an archive without them cannot build the documentation it carries.
    manifest = _read("MANIFEST.in")
    patterns = re.search(r"^recursive-include docs (.+)$", manifest, flags=re.M).group(1).split()
    hooks = re.findall(r"^\s*-\s*(docs/\S+)$", _read("mkdocs.yml").split("hooks:", 1)[1].split("\n\n")[0], flags=re.M)
    assert hooks
    for hook in hooks:
        assert any(fnmatch.fnmatch(os.path.basename(hook), p) for p in patterns), f"MANIFEST.in leaves out {hook}"
