"""Headless Chromium over a real TensorBoard (`tensorboard --logdir runs/vae`, the README's
command) on a short real VAE run: what a researcher sees first.

Debian's `chromium` (/usr/bin/chromium) driven by Playwright with its `executable_path`. The
test skips only when that browser is absent, and under `.ci/run` (TERMWISE_CI=1) it fails
instead. `python tests/trainer/test_browser.py LOGDIR OUT_PREFIX` saves the screenshots of
the README (Time Series, the two heatmaps, HParams) of an existing run directory.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import urllib.parse

import pytest
from test_tensorboard_server import TensorBoard, run_vae, unlabelled_digits

from termwise.trainer.summaries import read_events, scalar_series

CHROMIUM = "/usr/bin/chromium"
TERMS = ("kl", "reconstruction")


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def to_precision(value: float, digits: int) -> str:
    """JavaScript's `value.toPrecision(digits)` for 1e-4 <= |value| < 1e21 (HParams' cells)."""
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    return f"{value:.{decimals}f}"


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("TERMWISE_CI"):
            pytest.fail(message + ": under CI the browser test may not skip")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("browser")
    log_dir = root / "runs" / "vae"
    result = run_vae(str(log_dir), unlabelled_digits(root))
    tensorboard = TensorBoard(log_dir, root / "tensorboard.log")
    try:
        tensorboard.wait_until(lambda t: len(t.get("/data/runs")) == 3 and t.session_groups())
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield {"page": page, "url": tensorboard.url, "log_dir": log_dir, "result": result}
            browser.close()
    finally:
        tensorboard.stop()


def scalar_card(page, tag: str):
    card = page.locator("scalar-card", has=page.locator(f'tb-truncated-path[title="{tag}"]'))
    card.scroll_into_view_if_needed()
    return card


def test_time_series_draws_one_coloured_named_line_per_term(browser_page):
    from PIL import Image

    page = browser_page["page"]
    page.goto(browser_page["url"] + "/#timeseries")
    card = scalar_card(page, "by_term/train/share")
    rows = card.locator("tb-data-table-content-row")
    rows.nth(len(TERMS) - 1).wait_for()
    legend = {}  # the legend (the data table under the chart): run -> (colour, value)
    for i in range(rows.count()):
        cells = [
            c.strip() for c in rows.nth(i).locator("tb-data-table-content-cell").all_inner_texts()
        ]
        colour = (
            rows.nth(i)
            .locator(".row-circle span")
            .evaluate("e => getComputedStyle(e).backgroundColor")
        )
        legend[cells[1]] = (colour, float(cells[3]))
    assert sorted(legend) == [f"terms/{t}" for t in TERMS]  # not the run "."
    colours = {colour for colour, _ in legend.values()}
    assert len(colours) == len(TERMS), legend
    events = read_events(browser_page["log_dir"])
    for term in TERMS:  # each line ends at the flat tag's last value
        _, last = scalar_series(events, f"share/{term}")[-1]
        assert legend[f"terms/{term}"][1] == pytest.approx(last, abs=1e-4), term

    # Each line is drawn in its legend's colour (the chart may be drawn after the legend on a
    # loaded machine: a few more screenshots before the verdict).
    def near_counts():
        chart = Image.open(io.BytesIO(card.locator(".series-view").screenshot())).convert("RGB")
        pixels = list(chart.getdata())
        counts = {}
        for colour in colours:
            rgb = [int(v) for v in colour[colour.index("(") + 1 : colour.index(")")].split(",")]
            counts[colour] = sum(
                1 for p in pixels if sum((a - b) ** 2 for a, b in zip(p, rgb, strict=True)) < 900
            )
        return counts

    for _ in range(10):
        counts = near_counts()
        if min(counts.values()) >= 30:
            break
        page.wait_for_timeout(1000)
    assert min(counts.values()) >= 30, counts


def test_hparams_table_shows_metric_values(browser_page):
    page, result = browser_page["page"], browser_page["result"]
    page.goto(browser_page["url"] + "/#hparams")
    cells = page.locator("tf-hparams-table-view vaadin-grid-cell-content")
    for text in ("eval/negative_elbo", to_precision(result["negative_elbo"], 5)):
        cells.filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$")).first.wait_for()
    texts = [t.strip() for t in cells.all_inner_texts()]
    for name in ("reconstruction", "kl", "total", "negative_elbo"):
        assert f"eval/{name}" in texts, name
        assert to_precision(result[name], 5) in texts, (name, result[name])
    assert "none" in texts  # balancer="none": the run is in the table and its plots


def save_screenshots(url: str, prefix: str) -> list[str]:
    """Screenshots of `url`'s Time Series (per-term lines), its two heatmaps and HParams."""
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url + "/#timeseries")
        page.locator("scalar-card").first.wait_for()
        settings = page.locator("button", has_text="Settings")  # the pane opens by default
        if settings.count() and page.get_by_text("Horizontal Axis").count():
            settings.first.click()
        views = [
            ("time_series", "scalar-card", r"^by_term/.*/(share|grad_share|loss)$"),
            ("grad_cosine", "image-card", r"^images/grad_cosine/"),
            ("term_layer_share", "image-card", r"^images/term_layer_share/"),
        ]
        for name, card, regex in views:
            page.locator('input[placeholder="Filter tags (regex)"]').fill(regex)
            page.keyboard.press("Escape")  # closes the filter's suggestions
            page.locator(card).first.wait_for()
            page.wait_for_timeout(4000)
            saved.append(f"{prefix}_{name}.png")
            if card == "image-card":  # the last phase's heatmap, as the page loads it
                source = page.locator(card).last.locator("img").get_attribute("src")
                with open(saved[-1], "wb") as f:
                    f.write(page.request.get(urllib.parse.urljoin(url + "/", source)).body())
            else:
                page.screenshot(path=saved[-1])
        page.goto(url + "/#hparams")
        page.locator("tf-hparams-table-view").wait_for()
        page.wait_for_timeout(4000)
        experiment = page.request.post(url + "/data/plugin/hparams/experiment", data={})
        hidden = {h["name"] for h in experiment.json()["hparamInfos"]} - {"balancer"}
        checked = page.locator("tf-hparams-query-pane paper-checkbox[checked]")
        for _ in range(100):  # hides the hparams columns but balancer's: room for the metrics
            boxes = [b for b in checked.all() if b.inner_text().strip() in hidden]
            if not boxes:
                break
            boxes[0].click()
        page.wait_for_timeout(1000)
        saved.append(f"{prefix}_hparams.png")
        page.screenshot(path=saved[-1])
        browser.close()
    return saved


if __name__ == "__main__":
    logdir, prefix = sys.argv[1:3]
    server = TensorBoard(logdir, prefix + "_tensorboard.log")
    try:
        server.wait_until(lambda t: t.get("/data/runs"))
        print("\n".join(save_screenshots(server.url, prefix)))
    finally:
        server.stop()
