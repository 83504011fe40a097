"""Open an HTML page in headless Chromium (Debian's ``chromium``) and report what a person would see.

Used by the report's test and by ``benchmarks/report_screenshot.py``; tests skip where no Chromium is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

#: Runs before the page's own content: records script errors, failed resources and console errors, and on
#: load writes what is visible (each image loaded and drawn, each section's height) into a <pre>.
_PROBE = """<script>
window.__problems = [];
window.addEventListener("error", e => window.__problems.push(
  e.message ? "script error: " + e.message : "failed to load: " + ((e.target && (e.target.src || e.target.href)) || "?")
), true);
const __consoleError = console.error;
console.error = (...args) => { window.__problems.push("console.error: " + args.join(" ")); __consoleError(...args); };
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({
    alt: i.alt, loaded: i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width
  }));
  const sections = [...document.querySelectorAll("section")].map(s => ({
    id: s.id, height: s.getBoundingClientRect().height,
    headings: [...s.querySelectorAll("h2")].map(h => h.textContent)
  }));
  const out = document.createElement("pre");
  out.id = "__probe";
  out.textContent = JSON.stringify({title: document.title, images, sections, problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    """The Chromium executable, or None where none is installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=timeout)


def what_is_visible(page: Path, work: Path) -> dict:
    """Load ``page`` (a copy with the probe inserted, in ``work``) and return what the probe saw."""
    html = page.read_text(encoding="utf-8")
    probed = work / f"probed-{page.name}"
    probed.write_text(html.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    result = _run(["--dump-dom", probed.resolve().as_uri()])
    found = re.search(r'<pre id="__probe">(.*?)</pre>', result.stdout, re.S)
    if found is None:
        raise RuntimeError(f"chromium did not run the page: {result.stderr[-2000:]}")
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 3000) -> None:
    """A PNG of ``page`` as Chromium draws it in a ``width`` × ``height`` window."""
    result = _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}", page.resolve().as_uri()])
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot: {result.stderr[-2000:]}")
