"""Screenshot of a report's first screen for the README: headless Debian chromium via Playwright.

Usage: python scripts/screenshot.py runs/demo/report.html docs/report.png [--width 1100 --height 1400]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=1400)
    ap.add_argument("--scale", type=float, default=0.7, help="device scale factor (smaller PNG)")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not a.report.is_file() or chromium is None:
        raise SystemExit(f"need {a.report} and Debian's chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": a.width, "height": a.height}, device_scale_factor=a.scale)
        page.goto(a.report.resolve().as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(1500)  # let plotly draw
        a.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.out), full_page=False)
        browser.close()
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
