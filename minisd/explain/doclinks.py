"""Code links of the docs, written [`code`](../minisd/file.py#L10-L12): the link text is a piece of the first
linked line, so a link can be checked (the text is on the lines it points at) and re-anchored when the code
moves (`make docs` finds the text again and rewrites the line numbers, keeping the range's length)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
LINK = re.compile(r"\[`(?P<text>[^`]+)`\]\((?P<path>\.\./[^)#\s]+)#L(?P<start>\d+)(?:-L(?P<end>\d+))?\)")


@dataclass
class CodeLink:
    doc: Path
    text: str
    path: str   # as written, relative to the doc
    start: int
    end: int
    span: tuple[int, int]  # where the link sits in the doc's text

    @property
    def target(self) -> Path:
        return (self.doc.parent / self.path).resolve()


def code_links(doc: Path) -> list[CodeLink]:
    text = doc.read_text(encoding="utf-8")
    return [CodeLink(doc, m["text"], m["path"], int(m["start"]), int(m["end"] or m["start"]), m.span())
            for m in LINK.finditer(text)]


def _squash(text: str) -> str:
    return " ".join(text.split())


def problem(link: CodeLink) -> str | None:
    """Why a link is wrong (None when it points at existing lines that hold its text)."""
    if not link.target.is_file():
        return f"{link.path}: no such file"
    lines = link.target.read_text(encoding="utf-8").splitlines()
    if not 1 <= link.start <= link.end <= len(lines):
        return f"{link.path}#L{link.start}-L{link.end}: outside the file's {len(lines)} lines"
    if _squash(link.text) not in _squash(lines[link.start - 1]):
        return f"{link.path}#L{link.start}: line {link.start} does not hold `{link.text}`"
    return None


def check_links(folder: Path = DOCS) -> list[str]:
    """Every problem of every code link in the folder's .md files, as 'doc: problem'."""
    return [f"{doc.name}: {issue}" for doc in sorted(folder.glob("*.md")) for link in code_links(doc)
            if (issue := problem(link))]


def update_links(folder: Path = DOCS) -> dict[str, int]:
    """Re-anchor links whose text moved: the line holding the text nearest the old position becomes the start.
    Returns the number of links changed per doc (links whose text is gone are left for check_links to report)."""
    changed: dict[str, int] = {}
    for doc in sorted(folder.glob("*.md")):
        text, count = doc.read_text(encoding="utf-8"), 0
        for link in reversed(code_links(doc)):  # from the end, so earlier spans stay valid
            if not link.target.is_file() or problem(link) is None:
                continue
            lines = link.target.read_text(encoding="utf-8").splitlines()
            found = [i + 1 for i, line in enumerate(lines) if _squash(link.text) in _squash(line)]
            if not found:
                continue
            start = min(found, key=lambda i: abs(i - link.start))
            end = start + link.end - link.start
            anchor = f"#L{start}" if end == start else f"#L{start}-L{end}"
            new = f"[`{link.text}`]({link.path}{anchor})"
            text = text[:link.span[0]] + new + text[link.span[1]:]
            count += 1
        if count:
            doc.write_text(text, encoding="utf-8")
            changed[doc.name] = count
    return changed
