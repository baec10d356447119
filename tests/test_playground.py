"""Browser tests of the playground page, run in Debian's headless Chromium (driven by Playwright) against the
real server: the page must stream replies, show their transparency data and render API errors readably."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, Response, expect, sync_playwright

from prosocialalign.core.paths import BUILD_DIR
from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = BUILD_DIR / "playground"  # the README's screenshots are copied from here into reports/
CHAT_PATH = "/v1/chat/completions"
GENERATION_TIMEOUT_MS = 240_000
MAX_TOKENS = 24

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page_errors() -> list[str]:
    return []


def guidance_on(live_server) -> bool:
    """Whether the server under test runs the ARM guidance (the fixture may start it with --no-guidance)."""
    return "--no-guidance" not in live_server.extra_args


def open_playground(browser: Browser, live_server, page_errors: list[str], width: int = 1280) -> Page:
    """Opens the page through `/` (which must lead to the playground) and enters the API key."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.add_init_script(RECORD_CHAT_BODIES)
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(f"{live_server.base_url}/")
    assert page.url.rstrip("/").endswith("/playground")
    expect(page).to_have_title("ProSocialAlign playground")
    enter_api_key(page, live_server.api_key)
    expect(page.locator("#model-name")).to_have_text(live_server.model)
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    return page


def enter_api_key(page: Page, key: str) -> None:
    field = page.get_by_label("API key")
    field.fill(key)
    field.press("Tab")  # leaving the field commits it ("change"), which reloads the model list


def choose_mode_with_keyboard(page: Page, arrow_presses: int) -> None:
    """Modes are a radio group: Guided, Unguided, Side by side; arrows move the selection."""
    page.locator("#mode-guided").focus()
    for _ in range(arrow_presses):
        page.keyboard.press("ArrowDown")


def is_chat_request(request: Request) -> bool:
    return request.url.endswith(CHAT_PATH) and request.method == "POST"


def collect_chat_responses(page: Page) -> list[Response]:
    responses: list[Response] = []
    page.on("response", lambda r: responses.append(r) if is_chat_request(r.request) else None)
    return responses


def last_turn(page: Page, pane: str) -> Locator:
    return page.locator(f"#log-{pane} .turn").last


def wait_until_answered(page: Page, panes: list[str]) -> None:
    for pane in panes:
        expect(last_turn(page, pane)).to_have_attribute("aria-busy", "false", timeout=GENERATION_TIMEOUT_MS)


def sse_payloads(body: str) -> list[dict]:
    """The JSON objects of a finished SSE body, without the final [DONE]."""
    payloads = []
    for line in body.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data != "[DONE]":
                payloads.append(json.loads(data))
    return payloads


# Chromium does not keep streamed (text/event-stream) bodies for Playwright to read back, so the test tees every
# chat response inside the page, before the page's own code reads it, and keeps the raw text the browser received.
RECORD_CHAT_BODIES = """
window.__chatBodies = [];
const pageFetch = window.fetch;
window.fetch = async (resource, options) => {
  const response = await pageFetch(resource, options);
  const url = typeof resource === "string" ? resource : resource.url;
  if (url.endsWith("/v1/chat/completions")) {
    const entry = { request: JSON.parse(options.body), status: response.status, body: null };
    window.__chatBodies.push(entry);
    response.clone().text().then((text) => { entry.body = text; });
  }
  return response;
};
"""


def raw_chat_body(page: Page, pane: str) -> str:
    """The full body of the newest chat response for a pane, as the browser received it."""
    unguided = pane == "unguided"
    page.wait_for_function(
        "(unguided) => window.__chatBodies.some((e) => (e.request.prosocial_guidance === false) === unguided"
        " && e.body !== null)",
        arg=unguided,
    )
    entries = page.evaluate("() => window.__chatBodies")
    return [e for e in entries if (e["request"].get("prosocial_guidance") is False) == unguided][-1]["body"]


def final_prosocial(page: Page, pane: str) -> dict | None:
    """The transparency object of the newest streamed reply in a pane (it rides on the final chunk's choice)."""
    found = None
    for chunk in sse_payloads(raw_chat_body(page, pane)):
        for choice in chunk.get("choices", []):
            if choice.get("prosocial"):
                found = choice["prosocial"]
    return found


def record_streamed_text(page: Page, pane: str) -> None:
    """Keeps every text the reply shows while it streams, to prove that it grows in steps."""
    page.evaluate(
        """(pane) => {
            window.__streamed = [];
            const log = document.getElementById(`log-${pane}`);
            new MutationObserver(() => {
                const content = log.querySelector('.turn:last-child .content');
                const text = content ? content.textContent : '';
                if (text && window.__streamed[window.__streamed.length - 1] !== text) window.__streamed.push(text);
            }).observe(log, {childList: true, subtree: true, characterData: true});
        }""",
        pane,
    )


def check_streamed_reply(page: Page, pane: str) -> None:
    turn = last_turn(page, pane)
    expect(turn.locator(".status")).to_contain_text("finished")
    expect(turn.get_by_role("alert")).to_be_hidden()
    final_text = turn.locator(".content").text_content()
    assert final_text.strip()
    streamed = page.evaluate("() => window.__streamed")
    assert len(streamed) >= 2, f"the reply did not arrive in steps: {streamed}"
    assert all(final_text.startswith(step) for step in streamed)


def check_transparency(page: Page, pane: str) -> None:
    """The table must show what the server sent on the final chunk, or say that nothing was sent."""
    prosocial = final_prosocial(page, pane)
    transparency = last_turn(page, pane).locator(".transparency")
    if prosocial is None:
        expect(transparency).to_contain_text("not available")
        return
    rows = {
        row.locator("th").inner_text(): row.locator("td").inner_text()
        for row in transparency.locator("tr").all()
    }
    assert rows["Guided"] == ("yes" if prosocial["guided"] else "no")
    assert rows["Safety mask"] == ("on" if prosocial["safety_mask"] else "off")
    assert rows["Tokens masked"] == str(prosocial["masked_tokens"])
    assert rows["Content filtered"] == ("yes" if prosocial["content_filtered"] else "no")
    for key, value in (prosocial.get("prefs") or {}).items():
        label = page.locator(f"label[for='pref-{key}']").inner_text()
        assert float(rows[f"Weight: {label}"]) == pytest.approx(value, abs=0.0051)


def check_error_rendered(page: Page, pane: str, response: Response) -> None:
    """The pane shows the status and the server's own message from the OpenAI-style error body."""
    error = last_turn(page, pane).get_by_role("alert")
    expect(error).to_be_visible()
    expect(error).to_contain_text(f"Error {response.status}")
    expect(error).to_contain_text(response.json()["error"]["message"])
    expect(last_turn(page, pane).locator(".transparency")).to_contain_text("not available")


def test_keyboard_reaches_every_control_with_visible_focus(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors)
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    reached: dict[str, str] = {}
    for _ in range(40):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => [document.activeElement.id, getComputedStyle(document.activeElement).outlineStyle]"
        )
        reached[focused[0]] = focused[1]
    expected = [f"pref-{key}" for key in PROSOCIAL_ATTRIBUTES]
    expected += ["api-key", "temperature", "max-tokens", "mode-guided", "prompt", "send", "clear"]
    for control_id in expected:
        assert control_id in reached, f"{control_id} cannot be reached with Tab"
        assert reached[control_id] == "solid", f"{control_id} has no visible focus outline"
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, textarea, select')]"
        ".filter((e) => !e.id || !document.querySelector(`label[for='${e.id}']`)).map((e) => e.outerHTML)"
    )
    assert unlabelled == [], "every form control needs a <label for=...>"
    assert page_errors == []
    page.close()


def test_guided_request_carries_the_sliders(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors)
    page.get_by_label("Empathy", exact=True).focus()
    page.keyboard.press("End")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#pref-empathy-value")).to_have_text("0.95")
    page.get_by_label("Sensitivity", exact=True).focus()
    page.keyboard.press("Home")
    expect(page.locator("#pref-sensitivity-value")).to_have_text("0.00")

    record_streamed_text(page, "guided")
    prompt = page.get_by_label("Message")
    prompt.fill("I feel lonely since I moved to a new city. What could help?")
    with page.expect_response(lambda r: is_chat_request(r.request), timeout=GENERATION_TIMEOUT_MS) as answer:
        prompt.press("Control+Enter")
    response = answer.value
    sent = response.request.post_data_json
    assert sent["stream"] is True
    assert sent["model"] == live_server.model
    assert sent["max_tokens"] == MAX_TOKENS
    assert "prosocial_guidance" not in sent
    assert sent["prosocial_prefs"] == {
        "empathy": 0.95,
        "sensitivity": 0.0,
        "non_judgmental": 0.5,
        "truthfulness": 0.5,
        "helpfulness": 0.5,
    }
    wait_until_answered(page, ["guided"])
    if guidance_on(live_server):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        check_streamed_reply(page, "guided")
        prosocial = final_prosocial(page, "guided")
        assert prosocial is not None, "a guided reply must carry transparency data"
        assert prosocial["guided"] is True
        check_transparency(page, "guided")
    else:
        # A server without guidance refuses preferences with a 400; the page must say so and suggest a fix.
        assert response.status == 400
        assert response.json()["error"]["code"] == "guidance_disabled"
        check_error_rendered(page, "guided", response)
        expect(last_turn(page, "guided").get_by_role("alert")).to_contain_text("choose the Unguided mode")
    page.screenshot(path=str(SCREENSHOTS / "playground-guided.png"), full_page=True)
    assert page_errors == []
    page.close()


def test_unguided_reply_streams_with_transparency_data(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors)
    choose_mode_with_keyboard(page, arrow_presses=1)
    expect(page.locator("#mode-unguided")).to_be_checked()
    expect(page.locator("#pane-guided")).to_be_hidden()
    record_streamed_text(page, "unguided")
    prompt = page.get_by_label("Message")
    prompt.fill("Write one friendly sentence about libraries.")
    with page.expect_response(lambda r: is_chat_request(r.request), timeout=GENERATION_TIMEOUT_MS) as answer:
        prompt.press("Control+Enter")
    response = answer.value
    sent = response.request.post_data_json
    assert sent["prosocial_guidance"] is False
    assert "prosocial_prefs" not in sent
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    wait_until_answered(page, ["unguided"])
    check_streamed_reply(page, "unguided")
    # With guidance loaded the safety mask still runs on unguided requests, so the server reports on it.
    assert (final_prosocial(page, "unguided") is not None) == guidance_on(live_server)
    check_transparency(page, "unguided")
    assert page_errors == []
    page.close()


def test_bad_api_key_shows_the_servers_error(browser: Browser, live_server, page_errors):
    direct = httpx.post(
        f"{live_server.base_url}{CHAT_PATH}",
        headers={"Authorization": "Bearer not-the-key"},
        json={"model": live_server.model, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=30,
    )
    assert direct.status_code == 401
    message = direct.json()["error"]["message"]

    page = open_playground(browser, live_server, page_errors)
    enter_api_key(page, "not-the-key")
    expect(page.locator("#model-status")).to_contain_text(message)
    page.get_by_label("Message").fill("Hello?")
    with page.expect_response(lambda r: is_chat_request(r.request)) as answer:
        page.get_by_role("button", name="Send").click()
    assert answer.value.status == 401
    assert answer.value.request.headers["authorization"] == "Bearer not-the-key"
    check_error_rendered(page, "guided", answer.value)
    expect(last_turn(page, "guided").get_by_role("alert")).to_contain_text("Check the API key")
    page.screenshot(path=str(SCREENSHOTS / "playground-error.png"))
    assert page_errors == []
    page.close()


def test_all_zero_preferences_are_refused_before_sending(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors)
    chat_requests: list[Request] = []
    page.on("request", lambda request: chat_requests.append(request) if is_chat_request(request) else None)
    for key in PROSOCIAL_ATTRIBUTES:
        page.locator(f"#pref-{key}").focus()
        page.keyboard.press("Home")
    page.get_by_label("Message").fill("Hello?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#form-message")).to_contain_text("all-zero")
    page.wait_for_timeout(500)
    assert chat_requests == []
    expect(page.locator("#log-guided .turn")).to_have_count(0)
    assert page_errors == []
    page.close()


def test_side_by_side_sends_unguided_and_guided(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors)
    responses = collect_chat_responses(page)
    choose_mode_with_keyboard(page, arrow_presses=2)
    expect(page.locator("#mode-both")).to_be_checked()
    expect(page.locator("#pane-unguided")).to_be_visible()
    expect(page.locator("#pane-guided")).to_be_visible()
    page.get_by_label("Message").fill("How do I make a bomb?")
    page.get_by_role("button", name="Send").click()
    wait_until_answered(page, ["unguided", "guided"])

    assert len(responses) == 2
    by_pane = {
        "unguided" if r.request.post_data_json.get("prosocial_guidance") is False else "guided": r
        for r in responses
    }
    assert set(by_pane) == {"unguided", "guided"}
    assert "prosocial_prefs" not in by_pane["unguided"].request.post_data_json
    assert "prosocial_prefs" in by_pane["guided"].request.post_data_json
    for pane, response in by_pane.items():
        if response.status == 200:
            expect(last_turn(page, pane).locator(".status")).to_contain_text("finished")
            check_transparency(page, pane)
        else:
            check_error_rendered(page, pane, response)
    assert by_pane["unguided"].status == 200
    assert by_pane["guided"].status == (200 if guidance_on(live_server) else 400)
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)
    assert page_errors == []
    page.close()


def test_narrow_screen_has_no_horizontal_scrolling(browser: Browser, live_server, page_errors):
    page = open_playground(browser, live_server, page_errors, width=390)
    page.get_by_label("Side by side: unguided and guided").check()
    page.get_by_label("Message").fill("Say hello in five words.")
    page.get_by_role("button", name="Send").click()
    wait_until_answered(page, ["unguided", "guided"])
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    for element in page.locator("input, textarea, button, .transparency, .pane, .error").all():
        box = element.bounding_box()
        if box is not None:
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, element.evaluate("e => e.outerHTML")
    unguided_box = page.locator("#pane-unguided").bounding_box()
    guided_box = page.locator("#pane-guided").bounding_box()
    assert guided_box["y"] >= unguided_box["y"] + unguided_box["height"], (
        "panes must stack on a narrow screen"
    )
    page.screenshot(path=str(SCREENSHOTS / "playground-narrow.png"), full_page=True)
    assert page_errors == []
    page.close()
