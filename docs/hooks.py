"""MkDocs hook: the benchmarks page includes bench/RESULTS.md (and its figure) from the source tree."""
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- bench/RESULTS.md -->"


def on_files(files, config):
    # bench/plot.png served as benchmarks-plot.png next to the pages
    files.append(File.generated(config, "benchmarks-plot.png", abs_src_path=os.path.join(ROOT, "bench", "plot.png")))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "benchmarks.md":
        return markdown
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as fh:
        results = fh.read()
    # RESULTS.md's own title becomes a section; its figure link is relative to bench/.
    results = results.replace("](plot.png)", "](benchmarks-plot.png)")
    lines, fenced = [], False
    for line in results.splitlines():
        fenced ^= line.startswith("```")  # a "# comment" inside a code block is no heading
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return markdown.replace(MARK, "\n".join(lines))
