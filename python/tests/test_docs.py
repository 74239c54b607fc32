"""The Markdown docs: every relative link resolves, every #anchor names a heading.

Walks every tracked *.md (`git ls-files '*.md'`), finds its links outside code
(inline `[text](target)`, images, reference definitions `[id]: target`, and
`href`/`src` attributes), and checks that each relative target exists in the
checkout and that each `#anchor` (in the same file or another Markdown file)
is the GitHub slug of one of that file's headings. Also: README.md stays a
page a newcomer reads in five minutes (at most 250 lines).

Needs neither etcd nor the library.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
README_MAX_LINES = 250

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+[\"'(][^)]*)?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_ATTR = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_HTML_ID = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def tracked_markdown() -> List[Path]:
    """`git ls-files '*.md'`; outside a git checkout (a copied tree), every *.md
    of the tree but build outputs and hidden directories."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "*.md"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=True,
        ).stdout.decode()
        return [REPO / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {"target", "build", "dist", "node_modules", "__pycache__"}
        return sorted(
            p
            for p in REPO.rglob("*.md")
            if not any(
                part in skip or part.startswith(".") or part.endswith(".egg-info")
                for part in p.relative_to(REPO).parts[:-1]
            )
        )


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    fence: Optional[str] = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield n, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            fence = None


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
        elif ch == " ":
            kept.append("-")
    return "".join(kept)


def anchors_of(path: Path, cache: Dict[Path, Set[str]]) -> Set[str]:
    if path not in cache:
        cache[path] = anchors_of_text(path.read_text(encoding="utf-8"))
    return cache[path]


def anchors_of_text(text: str) -> Set[str]:
    seen: Dict[str, int] = {}
    anchors: Set[str] = set()
    prev = ""
    for _, line in prose_lines(text):
        title = None
        m = _HEADING.match(line)
        if m:
            title = m.group(2)
        elif prev.strip() and _SETEXT.match(line) and not _HEADING.match(prev):
            title = prev.strip()
        if title is not None:
            slug = github_slug(title)
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
        anchors.update(a for a in _HTML_ID.findall(line))
        prev = line
    return anchors


def links_of(text: str) -> Iterator[Tuple[int, str]]:
    for n, line in prose_lines(text):
        bare = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in _INLINE_LINK.finditer(bare):
            yield n, m.group(1)
        m = _REF_DEF.match(bare)
        if m:
            yield n, m.group(1)
        for target in _HTML_ATTR.findall(bare):
            yield n, target


def problems_of(md: Path, cache: Dict[Path, Set[str]], text: Optional[str] = None) -> List[str]:
    """Every broken link of `md` (its `text` when given, else the file's)."""
    rel = md.relative_to(REPO)
    if text is None:
        text = md.read_text(encoding="utf-8")
    else:
        cache[md] = anchors_of_text(text)
    found = []
    for n, raw in links_of(text):
        target = raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked here
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if path_part.startswith("/"):
            dest = REPO / path_part.lstrip("/")
        elif path_part:
            dest = (md.parent / path_part).resolve()
        else:
            dest = md
        where = f"{rel}:{n}: {raw}"
        try:
            dest.relative_to(REPO)
        except ValueError:
            found.append(f"{where}: points outside the repository")
            continue
        if path_part and not dest.exists():
            found.append(f"{where}: {dest.relative_to(REPO)} does not exist")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                found.append(f"{where}: #{anchor} on a file that is not Markdown")
                continue
            if unquote(anchor).lower() not in anchors_of(dest, cache):
                found.append(
                    f"{where}: no heading in {dest.relative_to(REPO)} has the anchor #{anchor}"
                )
    return found


def test_github_slugs():
    assert github_slug("Options (`nixl_etcd_open`)") == "options-nixl_etcd_open"
    assert github_slug("Replacing NIXL's built-in etcd exchange") == "replacing-nixls-built-in-etcd-exchange"
    assert github_slug("GPU: KV blocks in GPU memory (features `nixl` + `cuda`)") == (
        "gpu-kv-blocks-in-gpu-memory-features-nixl--cuda"
    )
    assert github_slug("C++") == "c"
    assert github_slug("Operating it: the `nixl-etcd` command") == "operating-it-the-nixl-etcd-command"


def test_the_checker_finds_broken_links():
    # The checker itself must fail on what it is meant to catch.
    text = (
        "# Title\n\n## Same\n\n## Same\n\n"
        "[ok](#title) [dup](#same-1) [bad](#nope) [gone](missing.md) [up](../outside.md)\n"
        "[other](docs/c-api.md#statuses) [wrong](docs/c-api.md#no-such-heading)\n"
        "[img](docs/perf.png) [anchor on png](docs/perf.png#x)\n"
        "`[in code](missing-in-code.md)`\n\n```\n[fenced](missing-fenced.md)\n```\n"
        "[ref]: docs/missing-ref.md\n"
    )
    problems = problems_of(REPO / "probe.md", {}, text)
    assert [p.split(": ")[1] for p in problems] == [
        "#nope",
        "missing.md",
        "../outside.md",
        "docs/c-api.md#no-such-heading",
        "docs/perf.png#x",
        "docs/missing-ref.md",
    ], problems


def test_every_relative_link_and_anchor_resolves():
    files = tracked_markdown()
    assert REPO / "README.md" in files
    cache: Dict[Path, Set[str]] = {}
    problems = [p for md in files for p in problems_of(md, cache)]
    assert problems == [], "broken links:\n" + "\n".join(problems)


def test_readme_is_at_most_250_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_every_function_of_the_header_is_in_the_c_api_reference():
    header = (REPO / "include" / "nixl_etcd.h").read_text(encoding="utf-8")
    functions = set(re.findall(r"^(?:[\w ]+?[\s*]+)(nixl_etcd_\w+)\(", header, re.MULTILINE))
    assert len(functions) >= 20, functions
    reference = (REPO / "docs" / "c-api.md").read_text(encoding="utf-8")
    table = reference[reference.index("\n## Functions") :]
    listed = set(re.findall(r"`(nixl_etcd_\w+)\(", table))
    assert sorted(functions - listed) == [], "functions of the header missing in docs/c-api.md"
    assert sorted(listed - functions) == [], "docs/c-api.md lists functions the header lacks"
