"""The console in a real browser (headless Chromium driven by selenium) against the real stack: a live HTTP
server on the real default model, a real Celery worker building profiles, Redis and the database.

A signed-in tenant uploads a group's items, requests a build and watches the profile become ready; opens an
experiment's live results with the plot; streams the unsteered and the steered answer side by side. Another
tenant gets 404 on those pages, and a POST without the CSRF token is refused.

Screenshots of every page go to `$CONSOLE_SCREENSHOTS` (default: a pytest temporary folder); their paths are
printed. `make test` installs Chromium and chromedriver from the system packages when they are absent."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_helpers import FIXED, SMALL_ITEMS, new_auth

from service.api import chat
from service.cli.demo_ab import Client

pytestmark = pytest.mark.service

WAIT_S = 240  # the worker's first build loads the model
# The playground reads each question in both option orders, averaged: a DiffMean vector fitted on both orders
# carries no letter, and at strength 1 it moves those answers by about 0.001, below the bars' three decimals.
PLAYGROUND_STRENGTH = 16.0


def _browser_binaries() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the console's browser tests need Chromium and chromedriver; `make browser` installs them "
                    "(apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("console-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(screenshots: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(worker_settings, celery_worker, default_lm) -> Iterator[tuple[str, object]]:
    """A live HTTP server sharing the worker's database, Redis and artifact store."""
    from werkzeug.serving import make_server

    from service import create_app

    settings = dataclasses.replace(worker_settings, rate_limit_per_minute=100_000, max_new_tokens=64)
    app = create_app({"SETTINGS": settings, "GENERATION_MODEL": default_lm})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", settings
    finally:
        server.shutdown()
        thread.join(10)
        chat.stop_engine(app)


@pytest.fixture(scope="module")
def tenant(stack) -> dict[str, str]:
    """A tenant with a group `urban` (no items yet) and a user; its key."""
    url, settings = stack
    key = new_auth(settings)["Authorization"].split()[1]
    api = Client(url, key)
    api.call("PUT", "/v1/users/alice", {})
    api.call("PUT", "/v1/groups/urban", {"members": ["alice"]})
    return {"key": key}


def shot(driver, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def wait(driver, condition, timeout: float = 30):
    """Poll `condition` until truthy; an element replaced by a page reload meanwhile is just polled again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=ignored).until(condition)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def sign_in(driver, url: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{url}/console/login")
    css(driver, "#api-key").send_keys(key)
    css(driver, "#login-form button[type=submit]").click()
    wait(driver, lambda d: d.current_url.endswith("/console/profiles"))


def session_cookie(driver) -> str:
    cookie = driver.get_cookie("pluristeer_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return f"pluristeer_console={cookie['value']}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None


def http(method: str, url: str, cookie: str, data: bytes | None = None) -> int:
    """The status of a request outside the browser with the browser's session cookie (redirects not
    followed)."""
    request = urllib.request.Request(url, method=method, data=data, headers={"Cookie": cookie})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class State:
    profile_id: str = ""
    experiment_id: str = ""


def test_sign_in_upload_build_and_see_the_profile_become_ready(browser, stack, tenant, screenshots, tmp_path):
    url, _ = stack
    browser.get(f"{url}/console/profiles")
    assert "/console/login" in browser.current_url
    shot(browser, screenshots, "01-sign-in")
    sign_in(browser, url, tenant["key"])
    assert "No profiles yet" in browser.page_source

    browser.get(f"{url}/console/subjects/group/urban")
    items = tmp_path / "urban.jsonl"
    items.write_text("\n".join(json.dumps(it) for it in SMALL_ITEMS) + "\n")
    css(browser, "#upload-form input[type=file]").send_keys(str(items))
    css(browser, "#upload-form button").click()
    wait(browser, lambda d: f"({len(SMALL_ITEMS)}; page 1 of 1)" in d.page_source)
    assert SMALL_ITEMS[0]["question"] in css(browser, "#items").text
    shot(browser, screenshots, "02-group")

    css(browser, "#build-form input[name=layer]").send_keys(str(FIXED["layer"]))
    css(browser, "#build-form input[name=strength]").send_keys(str(PLAYGROUND_STRENGTH))
    css(browser, "#build-form button").click()
    wait(browser, lambda d: "/console/profiles/" in d.current_url)
    State.profile_id = browser.current_url.rsplit("/", 1)[1]
    # The page follows the build live and shows the results once the worker marks it ready.
    wait(browser, lambda d: css(d, "#profile-status").text == "ready", WAIT_S)
    wait(browser, lambda d: d.find_elements("css selector", "#metrics"))
    metrics = css(browser, "#metrics").text
    assert "unsteered" in metrics and "steered" in metrics and "alignment" in metrics
    assert css(browser, "#chosen-layer").text == str(FIXED["layer"])
    assert css(browser, "#alignment-plot").text.count("\n") >= 1
    shot(browser, screenshots, "03-profile-ready")
    # Each item's alignment before and after, drawn inline; a fixed-setting build is judged in-sample and
    # fits no calibration, so "before" is the unsteered model.
    plot = css(browser, "#per-item-plot")
    svg = css(browser, "#per-item-plot svg")
    assert svg.get_attribute("role") == "img" and svg.get_attribute("aria-labelledby")
    assert len(svg.find_elements("css selector", "g.item")) == len(SMALL_ITEMS)
    assert svg.size["width"] > 300 and svg.size["height"] > 100  # laid out, not collapsed
    caption = css(browser, "#per-item-plot figcaption").text
    assert caption.startswith("Mean gain of steered over unsteered: ") and f"{len(SMALL_ITEMS)} items" in caption
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", plot)
    shot(browser, screenshots, "03b-profile-per-item-plot")
    browser.get(f"{url}/console/profiles")
    assert "ready" in css(browser, "#profiles").text
    shot(browser, screenshots, "04-profiles")


def test_experiment_results_with_their_plot(browser, stack, tenant, screenshots):
    url, settings = stack
    assert State.profile_id, "needs the profile of the test before"
    browser.get(f"{url}/console/experiments")
    css(browser, "#experiment-form input[name=name]").send_keys("urban steering")
    css(browser, "input[name=variant_name_1]").send_keys("control")
    css(browser, "input[name=variant_name_2]").send_keys("urban")
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "select[name=variant_profile_2]")).select_by_value(State.profile_id)
    Select(css(browser, "select[name=scope]")).select_by_visible_text("urban")
    shot(browser, screenshots, "05-new-experiment")
    css(browser, "#experiment-form button[type=submit]").click()
    wait(browser, lambda d: "/console/experiments/" in d.current_url)
    State.experiment_id = browser.current_url.rsplit("/", 1)[1]

    # Live traffic through the API: alice is served her variant, then gives a thumbs up.
    api = Client(url, tenant["key"])
    served = api.call("POST", "/v1/chat/completions", {
        "model": settings.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
        "temperature": 0, "user": "alice", "steering": {"experiment": State.experiment_id}})
    api.call("POST", f"/v1/experiments/{State.experiment_id}/feedback", {"response_id": served["id"], "thumbs": "up"})
    browser.refresh()
    variant = served["steering"]["variant"]
    rows = {r.find_element("css selector", "th").text.split()[0]:
            [td.text for td in r.find_elements("css selector", "td")]
            for r in browser.find_elements("css selector", "#results tbody tr")}
    assert set(rows) == {"control", "urban"}
    assert rows[variant][:3] == ["1", "1", "1"]  # assigned, exposures, feedback
    other_variant = ({"control", "urban"} - {variant}).pop()
    assert rows[other_variant][:3] == ["0", "0", "0"]
    plot = css(browser, "#results-plot")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 100)
    assert "too little feedback" in css(browser, "#summary").text
    assert css(browser, "#experiment-state").text == "running"
    shot(browser, screenshots, "06-experiment")
    css(browser, "#pause-button").click()
    wait(browser, lambda d: css(d, "#experiment-state").text == "paused")


def test_playground_streams_both_answers_side_by_side(browser, stack, tenant, screenshots):
    url, _ = stack
    assert State.profile_id
    browser.get(f"{url}/console/playground")
    slider = css(browser, f"input[data-profile='{State.profile_id}']")
    assert slider.get_attribute("value") == "1"
    tokens = css(browser, "input[name=max_tokens]")
    tokens.clear()
    tokens.send_keys("12")  # a shared CPU: a short answer
    css(browser, "#generate").click()
    for side in ("unsteered", "steered"):
        wait(browser, lambda d, side=side: "done" in css(d, f"#answer-{side}").get_attribute("class"), WAIT_S)
        assert css(browser, f"#answer-{side}").text.strip(), side
    assert css(browser, "#applied-unsteered").text == "unsteered"
    applied = css(browser, "#applied-steered").text
    assert applied.startswith(f"steered by {State.profile_id[:8]} × 1") and "layer 15" in applied
    assert not css(browser, "#playground-error").is_displayed()

    css(browser, "#score").click()
    for side in ("unsteered", "steered"):
        wait(browser, lambda d, side=side: len(d.find_elements("css selector", f"#bars-{side} .bar-value")) == 3)
        probs = [float(e.text) for e in browser.find_elements("css selector", f"#bars-{side} .bar-value")]
        assert abs(sum(probs) - 1) < 0.01 and all(p >= 0 for p in probs), probs
    shot(browser, screenshots, "07-playground")
    bars = {side: [float(e.text) for e in browser.find_elements("css selector", f"#bars-{side} .bar-value")]
            for side in ("unsteered", "steered")}
    print("playground bars:", bars)
    # The steered side is really steered: the profile moves the answer distribution.
    assert max(abs(a - b) for a, b in zip(bars["unsteered"], bars["steered"], strict=True)) > 0.005, bars


def test_another_tenant_gets_404_and_csrf_less_posts_are_refused(browser, stack, tenant, screenshots):
    url, settings = stack
    assert State.profile_id and State.experiment_id
    other = new_auth(settings, f"other-{uuid.uuid4().hex[:6]}")["Authorization"].split()[1]
    sign_in(browser, url, other)
    cookie = session_cookie(browser)
    pages = [f"/console/profiles/{State.profile_id}", f"/console/experiments/{State.experiment_id}",
             f"/console/experiments/{State.experiment_id}/results.png", "/console/subjects/group/urban"]
    for page in pages:
        assert http("GET", url + page, cookie) == 404, page
    browser.get(url + pages[0])
    assert css(browser, "h1").text == "404" and "not found" in css(browser, "#error-message").text
    shot(browser, screenshots, "08-other-tenant-404")

    # The owner, signed in: a POST from the page's own script without the token is refused, with it not.
    sign_in(browser, url, tenant["key"])
    cookie = session_cookie(browser)
    delete = f"/console/profiles/{State.profile_id}/delete"
    assert http("POST", url + delete, cookie, b"") == 403
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', credentials: 'same-origin'}).then(r => done(r.status));", delete)
    assert status == 403
    assert http("GET", f"{url}/console/profiles/{State.profile_id}", cookie) == 200  # still there
    css(browser, "#sign-out").click()
    wait(browser, lambda d: "/console/login" in d.current_url)
    assert http("GET", f"{url}/console/profiles", cookie) == 302  # the signed-out session opens nothing
