"""benchmarks/results_file.py: a rerun rewrites the generated table and keeps the notes written under it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from results_file import NOTES_MARKER, write_results


def test_a_rerun_replaces_the_table_and_keeps_the_hand_written_notes(tmp_path):
    path = tmp_path / "bench.md"
    write_results(path, "# Bench\n\n| a |\n|---|\n| 1 |\n")
    assert path.read_text() == "# Bench\n\n| a |\n|---|\n| 1 |\n"
    path.write_text(path.read_text() + f"\n{NOTES_MARKER}\n\nSession 3: the first run, by hand.\n")
    write_results(path, "# Bench\n\n| a |\n|---|\n| 2 |")
    text = path.read_text()
    assert text.startswith("# Bench\n\n| a |\n|---|\n| 2 |\n\n" + NOTES_MARKER)
    assert text.endswith("Session 3: the first run, by hand.\n") and "| 1 |" not in text
    write_results(path, "# Bench\n\n| a |\n|---|\n| 3 |\n")  # and again: the notes are not doubled
    assert path.read_text().count("Session 3") == 1 and "| 3 |" in path.read_text()


def test_a_file_without_the_marker_is_replaced_whole(tmp_path):
    path = tmp_path / "bench.md"
    path.write_text("# Old\n\nnotes without a marker\n")
    write_results(path, "# New\n")
    assert path.read_text() == "# New\n"
