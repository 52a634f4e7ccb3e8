"""The README is a front page and docs/ holds the rest: every relative link and #anchor in them resolves, every
docs page is reachable from the README, and the README stays short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))  # the user pages and the measurements log (docs/measurements/)
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target), with an optional "title"; the target has no spaces or parentheses.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())  # \w keeps letters, digits, _ (any script)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them (x, x-1, x-2)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link outside code blocks and code spans."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group(1)
            if not EXTERNAL.match(target):
                links.append((number, target))
    return links


def broken_links(path: Path) -> list[str]:
    """'file:line: target (why)' for each relative link of `path` that does not resolve."""
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{where} (an anchor into a file that is not Markdown)")
        elif anchor and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with this anchor in {resolved.name})")
    return broken


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def linked_pages(path: Path) -> set[Path]:
    """The Markdown files that `path` links to (a link to a folder counts as a link to its README.md)."""
    pages = set()
    for _, target in relative_links(path):
        file_part = target.partition("#")[0]
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        if resolved.is_dir():
            resolved = resolved / "README.md"
        if resolved.suffix == ".md" and resolved.exists():
            pages.add(resolved)
    return pages


def test_every_docs_page_is_linked_from_the_readme():
    """User pages are linked from the README itself; a measurements log may be reached through the pages it logs."""
    linked = linked_pages(README)
    assert [p.name for p in PAGES if p.parent == ROOT / "docs" and p.resolve() not in linked] == []
    reached, todo = {README.resolve()}, [README.resolve()]
    while todo:
        for page in linked_pages(todo.pop()) - reached:
            reached.add(page)
            todo.append(page)
    assert [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in reached] == []


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) < README_MAX_LINES


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# A page\n\n## Configuration (`config.json`)\n\n## Usage\n\n## Usage\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[fine](other.md#configuration-configjson) [fine](other.md#usage-1) [fine](#title) [web](https://x.org/#y)\n"
        "`[in a code span](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](missing.md) ![gone](img/missing.png) [bad anchor](other.md#nope) [bad](#nope) [x](other.md#usage-2)\n"
    )
    assert [line.split(": ", 1)[1] for line in broken_links(page)] == [
        "missing.md (no such file)",
        "img/missing.png (no such file)",
        "other.md#nope (no heading with this anchor in other.md)",
        "#nope (no heading with this anchor in page.md)",
        "other.md#usage-2 (no heading with this anchor in other.md)",
    ]
    assert slug("Think-Then-Embed: queries embedded with a reasoner's trace") == (
        "think-then-embed-queries-embedded-with-a-reasoners-trace"
    )
    assert slug("Index scoring against the machine's floor") == "index-scoring-against-the-machines-floor"


# ------------------------------------------------------------------------- the imports the snippets show
# Packages a snippet may import that are extras, not installed in the test environment.
OPTIONAL_PACKAGES = {"vllm"}


def python_snippets(path: Path) -> list[str]:
    """The ```python blocks of a page."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def snippet_imports() -> list[tuple[str, str]]:
    """(page, import statement) for every import in every Python snippet of the README and docs/."""
    import ast

    found = []
    for path in [README, *PAGES]:
        for snippet in python_snippets(path):
            for node in ast.walk(ast.parse(snippet)):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if module.split(".")[0] not in OPTIONAL_PACKAGES:
                        found.append((str(path.relative_to(ROOT)), ast.unparse(node)))
    return found


def test_the_snippets_import_only_what_exists():
    """Every import a snippet shows runs (in a fresh interpreter: names moved to new rooms keep their old paths)."""
    import subprocess
    import sys

    imports = snippet_imports()
    assert len(imports) > 10  # the snippets were found
    program = "\n".join(
        f"try:\n    {statement}\nexcept Exception as error:\n    print({page!r}, {statement!r}, repr(error))"
        for page, statement in imports
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr[-2000:]
