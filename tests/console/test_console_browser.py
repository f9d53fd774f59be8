"""The console in a real browser (headless Chromium driven by selenium) against the real stack: a live HTTP
server on the real default model, a real Celery worker building profiles, Redis and the database.

A signed-in tenant uploads a group's items, requests a build and watches the profile become ready; opens an
experiment's live results with the plot; streams the unsteered and the steered answer side by side. Another
tenant gets 404 on those pages, and a POST without the CSRF token is refused. An experiment's page shows the
offline comparison the API stored, and offers none where there can be none (no scope group); the alignment
bars are drawn on a scale that shows their differences; a profile page says yes/no and reads its params in
words; the icons load and `/` leads to the console; groups and users are paged and searched.

Screenshots of every page go to `$CONSOLE_SCREENSHOTS` (default: a pytest temporary folder); their paths are
printed. `make test` installs Chromium and chromedriver from the system packages when they are absent."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import urlsplit

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
    return http_response(method, url, cookie, data)[0]


def http_response(method: str, url: str, cookie: str = "", data: bytes | None = None) -> tuple[int, Message, bytes]:
    """(status, headers, body) of a request outside the browser (redirects not followed)."""
    request = urllib.request.Request(url, method=method, data=data, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


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


def _offline_results(api: Client, experiment_id: str) -> dict:
    """The experiment's results once the worker has stored its offline comparison (asked for by the first call)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        results = api.call("GET", f"/v1/experiments/{experiment_id}/results?offline=true")
        offline = results["offline"]
        assert offline["status"] != "failed", offline
        if offline["available"]:
            return results
        assert time.monotonic() < deadline, f"no offline comparison after {WAIT_S} s: {offline}"
        time.sleep(1)


def test_experiment_page_shows_the_stored_offline_comparison(browser, stack, tenant, screenshots):
    url, _ = stack
    assert State.profile_id and State.experiment_id
    sign_in(browser, url, tenant["key"])
    api = Client(url, tenant["key"])
    # Without a scope group an experiment has no opinion items to score its variants on: the page says so and
    # offers nothing to ask for.
    unscoped = api.call("POST", "/v1/experiments", {
        "name": "unscoped", "variants": [{"name": "control"},
                                         {"name": "urban", "profiles": [{"id": State.profile_id}]}]})
    browser.get(f"{url}/console/experiments/{unscoped['id']}")
    offline = css(browser, "#offline").text
    assert "none for this experiment" in offline and "no scope group" in offline, offline
    assert not browser.find_elements("css selector", "#run-offline")
    assert not browser.find_elements("css selector", "#results td.offline-alignment")
    shot(browser, screenshots, "09-experiment-without-offline-comparison")

    # The scoped experiment can have one: none is stored yet, and the page offers to ask for it.
    page = f"{url}/console/experiments/{State.experiment_id}"
    browser.get(page)
    assert "not asked for yet" in css(browser, "#offline").text
    assert browser.find_elements("css selector", "#run-offline")
    assert not browser.find_elements("css selector", "#results td.offline-alignment")

    # Asked for through the API, scored and stored by the worker: the page reads it back without asking again.
    results = _offline_results(api, State.experiment_id)
    browser.get(page)
    offline = css(browser, "#offline").text
    assert "(ready)" in offline and results["offline"]["detail"] in offline, offline
    assert not browser.find_elements("css selector", "#run-offline")
    headers = [th.text for th in browser.find_elements("css selector", "#results thead th")]
    assert "offline alignment" in headers
    shown = [td.text for td in browser.find_elements("css selector", "#results td.offline-alignment")]
    assert shown == [f"{v['offline']['alignment']:.3f}" for v in results["variants"]], (shown, results["variants"])
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", css(browser, "#offline"))
    shot(browser, screenshots, "10-experiment-offline-comparison")


def test_alignment_bars_use_a_scale_that_shows_the_differences(browser, stack, tenant, screenshots):
    url, _ = stack
    assert State.profile_id
    sign_in(browser, url, tenant["key"])
    metrics = Client(url, tenant["key"]).call("GET", f"/v1/profiles/{State.profile_id}")["metrics"]
    browser.get(f"{url}/console/profiles/{State.profile_id}")
    scale = css(browser, "#alignment-scale").text
    match = re.search(r"from (\d+\.\d+) \(left edge\) to (\d+\.\d+) \(right edge\)", scale)
    assert match, scale
    start, end = float(match[1]), float(match[2])
    bars = []
    for row in browser.find_elements("css selector", "#alignment-plot .bar-row"):
        name = row.find_element("css selector", ".bar-label").text
        value = metrics[name]["alignment"]
        assert row.find_element("css selector", ".bar-value").text == f"{value:.3f}"
        track = row.find_element("css selector", ".bar").size["width"]
        fill = row.find_element("css selector", ".fill").size["width"]
        assert track > 100
        bars.append((value, fill / track))
    assert {"unsteered", "steered"} <= {r.find_element("css selector", ".bar-label").text
                                        for r in browser.find_elements("css selector", "#alignment-plot .bar-row")}
    low, high = min(v for v, _ in bars), max(v for v, _ in bars)
    spread = high - low
    assert spread >= 0.001, bars  # the steering at this strength moves the alignment
    # Each bar's length is its value's place on the labelled scale...
    for value, drawn in bars:
        assert drawn == pytest.approx((value - start) / (end - start), abs=0.01), (value, drawn, start, end)
    # ...and the scale hugs the values (a margin of about half their spread each side, at least 0.01, rounded to
    # hundredths), so a difference of a few hundredths is a large part of the bar, not a few pixels of 0 to 1.
    assert start <= low and high <= end and end - start <= 2 * spread + 0.04, (start, end, bars)
    shortest = min(drawn for _, drawn in bars)
    longest = max(drawn for _, drawn in bars)
    assert longest - shortest >= 0.9 * spread / (2 * spread + 0.04), bars
    if start > 0:
        assert "the bars start above 0" in scale
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", css(browser, "#alignment-plot"))
    shot(browser, screenshots, "11-profile-alignment-bars")


def test_profile_page_says_yes_or_no_and_reads_params_in_words(browser, stack, tenant, screenshots):
    url, _ = stack
    assert State.profile_id
    sign_in(browser, url, tenant["key"])
    profile = Client(url, tenant["key"]).call("GET", f"/v1/profiles/{State.profile_id}")
    browser.get(f"{url}/console/profiles/{State.profile_id}")
    body = css(browser, "body").text
    assert not re.search(r"\b(True|False|None|true|false|null)\b", body), body
    # Each yes/no the build recorded (e.g. whether a steering shipped) reads yes or no.
    flags = {name: value for name, value in profile["metrics"].items() if isinstance(value, bool)}
    assert flags, profile["metrics"]
    facts = {dt.text: dt.find_element("xpath", "following-sibling::dd[1]").text
             for dt in browser.find_elements("css selector", "#metrics dl.facts dt")}
    for name, value in flags.items():
        assert facts[name.replace("_", " ")] == ("yes" if value else "no"), (name, facts)
    # The requested params in words: each name with its value, no JSON braces or quotes.
    params = css(browser, "#params").text
    assert not set(params) & set('{}[]"'), params
    shown = [(k, v) for k, v in profile["params"].items() if v is not None]
    assert shown, profile["params"]
    for k, v in shown:
        assert k.replace("_", " ") in params, (k, params)
        if isinstance(v, bool):
            assert f"{k.replace('_', ' ')} {'yes' if v else 'no'}" in params
        elif isinstance(v, int):
            assert f"{k.replace('_', ' ')} {v}" in params
        elif isinstance(v, float):
            assert f"{k.replace('_', ' ')} {v:.3f}" in params
    assert css(browser, "#params").tag_name == "dd"
    shot(browser, screenshots, "12-profile-setting")


def test_favicon_and_the_root_redirect(browser, stack, tenant, screenshots):
    url, _ = stack
    status, headers, data = http_response("GET", f"{url}/favicon.ico")
    assert status == 200 and headers.get_content_maintype() == "image", (status, headers.get_content_type())
    assert data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    # `/` sends a browser to the console: the sign-in page signed out, the profiles signed in.
    status, headers, _ = http_response("GET", f"{url}/")
    assert status in (301, 302, 303, 307, 308) and urlsplit(headers["Location"]).path.startswith("/console")
    browser.delete_all_cookies()
    browser.get(f"{url}/")
    assert urlsplit(browser.current_url).path == "/console/login"
    # Every icon the page links to loads as an image (outside the browser and in it).
    links = [e.get_attribute("href") for e in browser.find_elements("css selector", "link[rel=icon]")]
    assert any(urlsplit(h).path == "/favicon.ico" for h in links), links
    for href in links:
        status, headers, _ = http_response("GET", href)
        assert status == 200 and headers.get_content_maintype() == "image", (href, status, headers.get_content_type())
        loaded = browser.execute_async_script(
            "const done = arguments[arguments.length - 1]; const img = new Image();"
            "img.onload = () => done(true); img.onerror = () => done(false); img.src = arguments[0];", href)
        assert loaded, href
    sign_in(browser, url, tenant["key"])
    browser.get(f"{url}/")
    assert urlsplit(browser.current_url).path == "/console/profiles"
    shot(browser, screenshots, "13-root-redirect")


def test_groups_and_users_are_paged_and_searched(browser, stack, screenshots):
    from service.console.views import SUBJECTS_PER_PAGE

    url, settings = stack
    key = new_auth(settings)["Authorization"].split()[1]  # a tenant of its own: the counts are its users only
    api = Client(url, key)
    users = [f"pager-{i:03d}" for i in range(SUBJECTS_PER_PAGE + 5)]  # sorted as the page sorts them
    for uid in users:
        api.call("PUT", f"/v1/users/{uid}", {})
    api.call("PUT", "/v1/groups/commuters", {"members": users[:3]})

    def listed(table: str) -> list[str]:
        return [a.text for a in browser.find_elements("css selector", f"#{table} tbody td a")]

    sign_in(browser, url, key)
    css(browser, "nav a[href$='/console/subjects']").click()
    wait(browser, lambda d: urlsplit(d.current_url).path == "/console/subjects")
    assert listed("users") == users[:SUBJECTS_PER_PAGE]
    assert listed("groups") == ["commuters"]
    assert "page 1 of 2" in css(browser, "#users-pager").text
    assert not browser.find_elements("css selector", "#users-previous")
    css(browser, "#users-next").click()
    wait(browser, lambda d: "page=2" in d.current_url)
    assert listed("users") == users[SUBJECTS_PER_PAGE:]
    assert "page 2 of 2" in css(browser, "#users-pager").text
    assert not browser.find_elements("css selector", "#users-next")
    assert listed("groups") == ["commuters"]  # the groups' own page is kept
    shot(browser, screenshots, "14-users-page-2")

    box = css(browser, "#subject-search input[name=q]")
    box.clear()
    box.send_keys("PAGER-01")  # a part of the id, any case
    css(browser, "#subject-search button[type=submit]").click()
    wait(browser, lambda d: "q=PAGER-01" in d.current_url)
    assert listed("users") == [u for u in users if "pager-01" in u]
    assert listed("groups") == []
    assert not browser.find_elements("css selector", "#users-pager")
    shot(browser, screenshots, "15-users-search")
    css(browser, "#clear-search").click()
    wait(browser, lambda d: "q=" not in d.current_url)
    assert listed("users") == users[:SUBJECTS_PER_PAGE]
