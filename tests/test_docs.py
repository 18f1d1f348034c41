"""Every ```python block of the documentation (docs/*.md and README.md) runs.

The blocks of one page run in order in one fresh process, sharing their names, as a reader runs
them.  A block whose first line is ``# docs-test: skip (<reason>)`` is not run (a fragment, or a
block that needs a GPU, escnn or more ranks): each such block is reported as a skipped test with its
reason, so the count shows in pytest's summary.  README's blocks are the files under examples/
(tests/test_examples.py) and run here as well, from the page.  A page whose blocks import escnn is
skipped where escnn is not installed (a failure under PROJKERNELS_REQUIRE_ESCNN=1, as in CI).  Python
in a block without a language would be missed, so such blocks are refused; README's links must resolve.
"""
import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"^# docs-test: skip \((.+)\)\s*$")
PAGES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))) + ["README.md"]


def fenced_blocks(path):
    """(line number, language, code) of every fenced block of the Markdown file ``path``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        text = fh.read()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)]


def python_blocks(path):
    """(line number, code) of every ```python block of the Markdown file ``path``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        text = fh.read()
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def _split(path):
    run, skipped = [], []
    for line, code in python_blocks(path):
        m = SKIP.match(code.splitlines()[0]) if code.strip() else None
        (skipped if m else run).append((line, m.group(1) if m else code))
    return run, skipped


RUN = [p for p in PAGES if _split(p)[0]]
SKIPPED = [(p, line, reason) for p in PAGES for line, reason in _split(p)[1]]


def test_the_pages_have_blocks_and_the_marker_is_honoured():
    assert RUN, "no documentation page has a python block"
    assert "docs/guide.md" in RUN and "docs/integrations.md" in RUN
    # the parser: a marked block is skipped with its reason, an unmarked one runs
    assert SKIP.match("# docs-test: skip (needs a GPU)").group(1) == "needs a GPU"
    assert SKIP.match("# docs-test: skip") is None


def _parses_as_python(code):
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)) for node in ast.walk(tree))


@pytest.mark.parametrize("page", PAGES)
def test_python_is_in_python_blocks(page):
    # A block without a language is not run: Python written in one would escape this test.
    unlabelled = [line for line, lang, code in fenced_blocks(page) if not lang and _parses_as_python(code)]
    assert not unlabelled, f"{page}: python code in blocks without a language at lines {unlabelled}: mark them python"


def _uses_escnn(code):
    return re.search(r"^\s*(from|import) escnn\b", code, flags=re.M) is not None


@pytest.mark.parametrize("page", RUN)
def test_page_blocks_run(page, tmp_path):
    run, _ = _split(page)
    if any(_uses_escnn(code) for _, code in run) and importlib.util.find_spec("escnn") is None:
        if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
            pytest.fail(f"{page} needs escnn, which is not installed (PROJKERNELS_REQUIRE_ESCNN=1)")
        pytest.skip(f"{page} needs escnn, an optional dependency")
    # One script: each block under a banner naming its line, so a failure points at the block.
    script = "\n".join(f"print('--- {page}:{line}', flush=True)\n{code}" for line, code in run)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    last = [l for l in out.stdout.splitlines() if l.startswith(f"--- {page}:")]
    assert out.returncode == 0, f"block at {last[-1][4:] if last else page} failed:\n{out.stderr[-3000:]}"
    assert len(last) == len(run)


@pytest.mark.parametrize("page,line,reason", SKIPPED, ids=[f"{p}:{l}" for p, l, _ in SKIPPED])
def test_marked_block(page, line, reason):
    pytest.skip(f"{page}:{line} marked docs-test: skip ({reason})")


def _anchors(path):
    """The anchors of the Markdown file's headings, as MkDocs and GitHub spell them."""
    with open(path, encoding="utf-8") as fh:
        text = re.sub(r"^```.*?^```$", "", fh.read(), flags=re.S | re.M)  # a comment in a block is no heading
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", h.lower()).strip()) for h in headings}


def test_readme_is_short_and_its_links_resolve():
    path = os.path.join(ROOT, "README.md")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert len(text.splitlines()) <= 150, "README.md is for a first visit: the rest belongs in docs/"
    assert re.search(r"!\[[^\]]*\]\(docs/demo\.png\)", text), "README.md shows the demo's figure"
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for target in links:
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.join(ROOT, file) if file else path
        assert os.path.exists(full), f"README.md links to {target}: no such file in the repository"
        if anchor:
            assert full.endswith(".md") and anchor in _anchors(full), f"README.md links to {target}: no such heading"


def test_the_api_reference_lists_every_public_name():
    import projkernels as pk
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as fh:
        documented = set(re.findall(r"^::: projkernels\.(\w+)\s*$", fh.read(), flags=re.M))
    missing = sorted(set(pk.__all__) - documented)
    assert not missing, f"docs/api.md: no entry for {missing}"
