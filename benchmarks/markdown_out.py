"""Writing a benchmark's Markdown page: the script redraws the generated part, the hand-written reading stays."""

from __future__ import annotations

from pathlib import Path

READING = "## Reading"


def write_keeping_reading(out: Path, text: str) -> str:
    """Write ``text`` to ``out``, followed by the ``## Reading`` section ``out`` already holds (if any); returns the
    page as written."""
    old = out.read_text() if out.is_file() else ""
    reading = old[old.index(READING):] if READING in old else ""
    page = text.rstrip("\n") + "\n" + ("\n" + reading if reading else "")
    out.write_text(page)
    return page
