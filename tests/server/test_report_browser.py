"""The history page of `incremental report` in Debian's Chromium: the lineage tree with its markers, a
gate check with its interval, and the inline chart are on screen, and the page fetches nothing.

The history is the one the report's integration tests build (v1, v2 accepted, v3 rejected with its batch
held, a rollback to v1, v4 accepted); the browser fixtures are tests/server/conftest.py's (
skipped without Chromium, failing in CI; screenshots kept in $INCREMENTAL_SCREENSHOTS_DIR when set).
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

from incremental.history_report import CHART_SIZE_PX, gather_history, write_report

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report_tests():
    """tests/integration/test_history_report.py, for its `make_history` (the test folders are not packages)."""
    spec = importlib.util.spec_from_file_location("history_report_tests", ROOT / "tests" / "integration" / "test_history_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


def test_the_page_shows_the_tree_a_gate_check_and_the_chart(chromium, page, shoot, tmp_path):
    from playwright.sync_api import expect

    history = report_tests().make_history(tmp_path / "finetuned_models", tmp_path / "feedback.duckdb")
    files = write_report(gather_history(history.registry, history.store), tmp_path / "reports")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(files.html.as_uri())

    def node(name: str):
        return page.locator(f'#lineage li[data-version="{name}"]').first

    expect(node(history.v4).locator(":scope > .badge.current")).to_have_text("★ current")
    expect(node(history.v1).locator(":scope > .badge.rollback")).to_contain_text("↩ rollback from v2")
    expect(node(history.v2).locator(":scope > .badge.rollback-from")).to_have_text("↪ rolled back to v1")
    expect(node(history.v2).locator(":scope > .badge.off")).to_be_visible()
    expect(node(history.v3).locator(":scope > .badge.rejected")).to_have_text("✗ rejected (reject)")
    # A metric: v3's failed target NLL check on the trusted rows, with the interval its manifest recorded.
    checks = history.registry.get(history.v3).manifest.gate.checks
    failed = next(c for c in checks if (c["metric"], c["slice"]) == ("target_nll", "regression"))
    row = page.locator(f'details[data-version="{history.v3}"] tr[data-metric="target_nll"][data-slice="regression"]')
    expect(row.locator('[data-field="interval"]')).to_have_text(f"[{failed['low']:+.4f}, {failed['high']:+.4f}]")
    expect(row.locator('[data-field="verdict"]')).to_have_text("fail")
    chart = page.locator("img.chart")
    expect(chart).to_be_visible()
    assert chart.evaluate("image => image.complete && image.naturalWidth") == CHART_SIZE_PX[0]

    # It fits the window's width (wide tables scroll in their own box), and it fetched nothing but itself.
    assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]
    assert [url for url in requested if not url.startswith(("file:", "data:"))] == []
    shot = shoot("history").read_bytes()
    assert shot[:8] == PNG_SIGNATURE and struct.unpack(">I", shot[16:20])[0] == page.viewport_size["width"]
