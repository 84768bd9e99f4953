"""README.md's module map lists every module of the package, and nothing else.

The map is the first fenced block after the ``## Module map`` heading of README.md. Each line
that starts (after indentation) with a path ending in ``.py`` lists one module; paths are
relative to ``rwkv_diffusion_rnn/``. Every ``rwkv_diffusion_rnn/**/*.py`` file except
``__init__.py`` must be listed, and every listed path must exist.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PKG = ROOT / "rwkv_diffusion_rnn"
HEADING = "## Module map"


def listed_modules(text: str) -> list[str]:
    """The module paths of the map in ``text`` (README.md's content), in order."""
    start = text.find(f"\n{HEADING}\n")
    assert start >= 0, f"README.md has no '{HEADING}' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", text[start:], re.M | re.S)
    assert block, f"README.md: no fenced block after '{HEADING}'"
    return re.findall(r"^[ \t]*((?:[\w.]+/)*[\w.]+\.py)(?=\s|$)", block.group(1), re.M)


def package_modules() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def test_listed_modules_parser_reads_paths_and_skips_headers():
    text = ("x\n## Module map\nintro\n```text\ncommon   the bottom layer\n"
            "  common/errors.py   errors\n  demo.py  the demo\n```\n```\nother.py\n```\n")
    assert listed_modules(text) == ["common/errors.py", "demo.py"]


def test_readme_module_map_matches_the_package():
    listed = listed_modules(README.read_text(encoding="utf-8"))
    duplicated = sorted({m for m in listed if listed.count(m) > 1})
    present = package_modules()
    missing = sorted(present - set(listed))
    extra = sorted(set(listed) - present)
    problems = []
    if missing:
        problems.append("modules missing from the map: " + ", ".join(missing))
    if extra:
        problems.append("listed modules that do not exist: " + ", ".join(extra))
    if duplicated:
        problems.append("modules listed twice: " + ", ".join(duplicated))
    assert not problems, (
        "; ".join(problems) + f". Update the '{HEADING}' block of README.md (one line per module, "
        "path relative to rwkv_diffusion_rnn/, under its layer).")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_of_the_docs_point_to_files_and_headings_that_exist():
    """README.md, docs/*.md, eval/README.md and eval/notes/*.md: every relative link names an
    existing file, and a #fragment names a heading of that file."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "eval" / "README.md",
             *sorted((ROOT / "eval" / "notes").glob("*.md"))]
    bad = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                if fragment not in {_anchor(h) for h in headings}:
                    bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links: " + "; ".join(bad)
