"""Screenshots of the MLflow UI as a user sees it, for the README (docs/figures/ui_*.png).

Serves the project's store with the same light server as `sgdnoise ui`, opens the links
it prints in headless Chromium and writes one PNG per page:

    ui_runs.png          the study's runs table (its grid), model-training view
    ui_parent.png        the study's parent run
    ui_parent_charts.png the parent run's metric charts: optimal ε_eff and best accuracy vs B
    ui_chart_view.png    the runs table's chart view

Run after `make study` (Debian: `apt-get install -y chromium` first):

    .venv/bin/python docs/ui_screenshots.py [--study constant_epochs]

The tests check the same structure through the server's REST API (tests/test_server.py);
Chromium is not needed to build or test the project.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sgdnoise.config import load_config
from sgdnoise.paths import project_root
from sgdnoise.server import TRAINING_VIEW, serving, study_links
from sgdnoise.tracking import resolve_uri

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    sys.exit("no Chromium found: apt-get install -y chromium (or put one on PATH)")


def screenshot(exe: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    """One page, rendered after `wait_ms` of virtual time (the UI is a single-page app)."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-background-networking", "--disable-extensions", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={size}",
            f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"wrote {out} <- {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="constant_epochs")
    ap.add_argument("--out", type=Path, default=None, help="default: docs/figures")
    ap.add_argument("--size", default="1800,1000", help="window size, pixels")
    ap.add_argument("--wait-ms", type=int, default=60000, help="virtual time per page")
    args = ap.parse_args(argv)
    root = project_root()
    out = args.out or root / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(root / "params.yaml")
    uri = resolve_uri(cfg, root)
    exe = browser()
    with serving(uri) as base:
        links = {s.study: s for s in study_links(uri, base, cfg.tracking.experiment)}
        if args.study not in links or links[args.study].parent is None:
            sys.exit(f"study {args.study!r} is not in {uri} (make study first)")
        s = links[args.study]
        parent = s.parent.split("?")[0]
        pages = {
            "ui_runs": s.runs,
            "ui_parent": s.parent,
            "ui_parent_charts": f"{parent}/model-metrics?{TRAINING_VIEW}",
            "ui_chart_view": f"{s.runs}&compareRunsMode=CHART",
        }
        for name, url in pages.items():
            screenshot(exe, url, out / f"{name}.png", args.size, args.wait_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
