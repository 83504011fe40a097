"""The HTML report as a person sees it: the demo's model on the shipped thyroid table, rendered by headless Chromium.

Writes ``benchmarks/results/report.png`` (a screenshot of the page) and ``benchmarks/results/report.md`` (what the
page showed: sections, images drawn, script or console errors). Needs Debian's ``chromium``.

    python benchmarks/report_screenshot.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import chromium, screenshot, what_is_visible  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help: what this measures
    from vaeguard import VAEAnomalyDetector
    from vaeguard.datasets import load_dataset
    from vaeguard.report import build_report

    if chromium() is None:
        raise SystemExit("headless Chromium is not installed (Debian: apt-get install chromium)")
    X, y = load_dataset("thyroid", return_X_y=True, as_frame=True)
    det = VAEAnomalyDetector(random_state=0).fit(X)
    frame = X.assign(patient=[f"p{i:04d}" for i in range(len(X))])
    page = build_report(
        det, frame, title="vaeguard report: thyroid", rows_in_file=len(frame), id_column="patient", labels=y == 1
    )
    out = REPO / "benchmarks" / "results"
    with tempfile.TemporaryDirectory() as work:
        html = Path(work) / "report.html"
        html.write_text(page, encoding="utf-8")
        seen = what_is_visible(html, Path(work))
        screenshot(html, out / "report.png")
    lines = [
        "# The HTML report in a browser",
        "",
        "Command: `python benchmarks/report_screenshot.py` (the default model on the shipped thyroid table, ids and "
        "labels given; headless Chromium; the screenshot is `report.png`).",
        "",
        f"- title: {seen['title']}",
        "- sections (height in px): " + ", ".join(f"{s['id']} ({s['height']:.0f})" for s in seen["sections"]),
        f"- images drawn: {sum(i['loaded'] for i in seen['images'])} of {len(seen['images'])}",
        f"- script, resource or console errors: {len(seen['problems'])}"
        + "".join(f"\n  - {p}" for p in seen["problems"]),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
