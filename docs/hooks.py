"""MkDocs hook: pages include the repository's own Markdown files, so the site repeats no text.

A line ``<!-- include FILE -->`` in a page is replaced by FILE (relative to the repository root);
``<!-- include FILE#HEADING -->`` by the section of FILE under that heading, up to the next
heading of the same level, with its headings raised so that it starts at ``#``. Relative links
in the included text are rewritten for the page: to another page of the site where the target is
one (``docs/x.md``, or a top-level file a page includes whole), otherwise to the path as code
(the site has no copy of the source tree). A missing file or heading fails the build.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_INCLUDE = re.compile(r"^<!-- include (?P<file>[^#\s]+)(?:#(?P<heading>[^>]+?))? -->\s*$", re.M)
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6}) ", re.M)
_FENCE = re.compile(r"^(```|~~~)")


class IncludeError(Exception):
    pass


def _pages_including_whole_files() -> dict[str, str]:
    """Top-level file -> the docs page (relative to docs/) that includes it whole."""
    pages = {}
    for page in DOCS.rglob("*.md"):
        for m in _INCLUDE.finditer(page.read_text(encoding="utf-8")):
            if not m.group("heading"):
                pages[m.group("file")] = page.relative_to(DOCS).as_posix()
    return pages


def _section(text: str, heading: str, source: str) -> str:
    lines = text.splitlines()
    in_fence = False
    start, level = None, 0
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = _HEADING.match(line)
        if in_fence or not m:
            continue
        if start is None and line[len(m.group(1)) + 1 :].strip() == heading.strip():
            start, level = i, len(m.group(1))
        elif start is not None and len(m.group(1)) <= level:
            return _raise_headings("\n".join(lines[start:i]), level - 1)
    if start is None:
        raise IncludeError(f"{source}: no heading {heading!r}")
    return _raise_headings("\n".join(lines[start:]), level - 1)


def _raise_headings(text: str, by: int) -> str:
    if by <= 0:
        return text
    out, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and _HEADING.match(line):
            line = line[by:]
        out.append(line)
    return "\n".join(out)


def _rewrite_links(text: str, source: str, page: str, whole: dict[str, str]) -> str:
    """Links relative to ``source`` (a repository path) made right for docs page ``page``."""
    source_dir = posixpath.dirname(source)
    page_dir = posixpath.dirname(page)

    def fix(m: re.Match[str]) -> str:
        target = m.group("target")
        if re.match(r"^[a-z]+:|^#|^/", target):  # a URL, an anchor, an absolute path
            return m.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(source_dir, path))
        doc = whole.get(repo_path)
        if doc is None and repo_path.startswith("docs/") and (ROOT / repo_path).is_file():
            doc = repo_path[len("docs/") :]
        if doc is None:
            return f"{m.group('text')} (`{repo_path}`)"
        rel = posixpath.relpath(doc, page_dir or ".")
        return f"[{m.group('text')}]({rel}{'#' + anchor if anchor else ''})"

    return _LINK.sub(fix, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each include line of ``page`` with the file (or section) it names."""
    if not _INCLUDE.search(markdown):
        return markdown
    whole = _pages_including_whole_files()

    def include(m: re.Match[str]) -> str:
        source = m.group("file")
        path = ROOT / source
        if not path.is_file():
            raise IncludeError(f"{page.file.src_uri}: included file {source} does not exist")
        text = path.read_text(encoding="utf-8")
        if m.group("heading"):
            text = _section(text, m.group("heading"), source)
        return _rewrite_links(text, source, page.file.src_uri, whole) + "\n"

    return _INCLUDE.sub(include, markdown)
