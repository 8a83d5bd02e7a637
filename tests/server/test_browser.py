"""The Prefect UI in a real browser against `incremental serve`: what a person clicks to start and
judge a retrain.

Debian's Chromium (`/usr/bin/chromium`, package `chromium`) driven by Playwright's sync API; never a
browser Playwright downloads. Without the browser (or the `playwright` package) these tests are
skipped with the reason, except in CI (`CI` or `INCREMENTAL_REQUIRE_BROWSER=1` set), where they fail:
`.ci/run` installs the browser first (`make browser`).

Every step saves a full-page screenshot in the test's tmp_path, and copies it to
`$INCREMENTAL_SCREENSHOTS_DIR` when that is set, for a person to look at.
"""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

VERDICT_KEY = "retrain-tiny"


def field_label(key: str, prop: dict) -> str:
    """The label the UI's schema form shows for a property: its title, or the key in title case."""
    return prop.get("title") or " ".join(word.capitalize() for word in key.split("_"))


def form_property(scope, label: str):
    """The innermost form property in `scope` (a page or a property) whose label starts with `label`
    (the UI shows e.g. 'Lora (Optional)'). The schema form labels no input for assistive technology,
    so this goes by the form's own classes."""
    page = getattr(scope, "page", scope)
    heading = page.locator(".schema-form-property__label").filter(has_text=re.compile(rf"^{re.escape(label)}\b"))
    return scope.locator(".schema-form-property").filter(has=heading).last


def test_custom_run_form_shows_the_run_config(chromium, prefect_server, served, page, shoot):
    from playwright.sync_api import expect

    schema = prefect_server.deployment("retrain/manual-tiny")["parameter_openapi_schema"]
    sections = {key: field_label(key, prop) for key, prop in schema["definitions"]["RunConfig"]["properties"].items()}
    assert set(sections) == {"lora", "train", "data", "gate", "novel_batch"}, sections

    # Deployments → manual-tiny → Run → Custom run, as a person clicks it.
    page.goto(f"{prefect_server.url}/deployments")
    page.get_by_role("link", name="manual-tiny", exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+"))
    expect(page.get_by_text("Entrypoint", exact=True)).to_be_visible()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("button", name="Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+/run"))

    expect(page.get_by_role("button", name="Submit", exact=True)).to_be_visible()
    for key, prop in schema["properties"].items():  # model, config, and whatever else the flow takes
        expect(form_property(page, field_label(key, prop))).to_be_visible()
    # The deployment's parameter, prefilled.
    expect(form_property(page, field_label("model", schema["properties"]["model"])).get_by_role("textbox")).to_have_value("tiny")
    for label in sections.values():
        expect(form_property(page, label)).to_be_visible()
    # A field of each section, with its default from incremental/config.py.
    for section, field, value in [
        ("Lora", "R", "16"), ("Train", "Epochs", "4"), ("Data", "Min New Rows", "1"), ("Novel Batch", "Epochs", "6"),
    ]:
        expect(form_property(form_property(page, section), field).get_by_role("spinbutton")).to_have_value(value)
    expect(form_property(form_property(page, "Gate"), "Screening")).to_be_visible()
    shoot("form")


def test_finished_run_page_shows_its_verdict_artifact(chromium, prefect_server, served, fast_config, page, shoot):
    from playwright.sync_api import expect

    prefect_server.add_feedback(30, 7301)
    created = prefect_server.create_run("retrain/manual-tiny", {"config": fast_config})
    run = prefect_server.wait(created["id"], logs=served)
    state = run["state"]
    assert state["type"] == "COMPLETED" and state["name"] in ("Completed", "Rejected"), (
        f"{state}\n{prefect_server.log_text(created['id'])}"
    )
    verdicts = [a for a in prefect_server.artifacts(created["id"]) if a["key"] == VERDICT_KEY]
    assert len(verdicts) == 1, prefect_server.artifacts(created["id"])
    headline = verdicts[0]["description"]

    page.goto(f"{prefect_server.url}/runs/flow-run/{created['id']}")
    for text in (run["name"], state["name"], "manual-tiny"):  # heading, state badge, deployment link
        expect(page.get_by_text(text, exact=True).filter(visible=True).first).to_be_visible()
    # The Logs tab (the default one) shows the training's progress lines.
    expect(page.get_by_text(re.compile(r"\[INCREMENTAL\] step \d+/\d+ loss")).first).to_be_visible()
    shoot("run")

    page.get_by_text("Artifacts", exact=True).click()
    card = page.get_by_role("link").filter(has=page.get_by_text(VERDICT_KEY, exact=True))
    expect(card).to_be_visible()
    shoot("artifacts-tab")

    card.click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/[0-9a-f-]+"))
    expect(page.get_by_text(re.compile(r"^Gate verdict: (accept|reject|inconclusive)", re.IGNORECASE)).first).to_be_visible()
    expect(page.get_by_text(headline, exact=True).filter(visible=True).first).to_be_visible()
    expect(page.get_by_role("cell", name="target_nll", exact=True).first).to_be_visible()
    shoot("artifact")
