"""Writing a benchmark's results file without losing the notes written under it by hand.

A results file is the table a benchmark generates, then (optionally) notes that sessions
add by hand: what a rerun changed, where the time goes, what was tried. Rewriting the
file on a rerun must keep those notes. They start at :data:`NOTES_MARKER`; everything
from that line on is carried over to the new file.
"""

from __future__ import annotations

from pathlib import Path

#: The line above a results file's hand-written notes (an HTML comment: invisible when rendered).
NOTES_MARKER = "<!-- notes below are written by hand and kept when the benchmark reruns -->"


def write_results(path: Path, generated: str) -> None:
    """Write ``generated`` to ``path``, followed by the notes of the file already there (if it has any)."""
    notes = ""
    if path.exists():
        old = path.read_text()
        at = old.find(NOTES_MARKER)
        if at >= 0:
            notes = old[at:]
    path.write_text(generated.rstrip("\n") + "\n" + ("\n" + notes if notes else ""))
