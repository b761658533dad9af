"""The storyboard page at `/`, in a real headless Chromium against a real local Serve app (tiny
preset) with API keys switched on, used as a person uses it: enter a key, make a subject from a
style and settings, watch its anchors arrive, add scenes, download the story, copy a request as
curl, see the API's message next to a bad prompt, delete the subject. No console errors, and
nothing wider than a phone's screen.

`CONSISTORY_UPDATE_SCREENSHOT=1` also writes the README's screenshot (docs/storyboard.png)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import console_errors, start_chromium, system_browser, wait_for_file, wait_until
from PIL import Image
from service_helpers import REQUEST_TIMEOUT_S, http, local_service, ok_json, tiny_service_args

from deployments.edge.api_keys import hash_token, new_token

pytestmark = pytest.mark.browser

TOKEN = new_token()
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "storyboard.png"
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
LOADED_IMAGES = "return [...document.querySelectorAll('#frames img')].filter(i => i.complete && i.naturalWidth > 0).length"
STEPS = 8  # enough steps that an image's progress is reported before it is done


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    system_browser()  # skip (or, in CI, fail) before starting a service for nothing
    store = {"kind": "local", "root": str(tmp_path_factory.mktemp("artifacts"))}
    args = tiny_service_args(store, generators=1,
                             auth={"enabled": True, "keys": [{"name": "ann", "sha256": hash_token(TOKEN)}]})
    with local_service(args) as base_url:
        yield base_url


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it ever reached, stays offline
    driver = start_chromium(tmp_path / "downloads")
    try:
        yield driver
    finally:
        driver.quit()


def api():
    session = http()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    return session


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def type_into(driver, selector: str, text: str) -> None:
    field = by_css(driver, selector)
    field.clear()
    field.send_keys(text)


def enter_key(driver, token: str) -> None:
    type_into(driver, "#api-key", token)
    by_css(driver, "#key-form button[type=submit]").click()


def loaded_images(driver, count: int) -> None:
    wait_until(driver, lambda d: d.execute_script(LOADED_IMAGES) >= count, f"{count} loaded images")
    assert driver.execute_script(LOADED_IMAGES) == count


def no_horizontal_overflow(driver) -> None:
    width = driver.execute_script("return document.documentElement.clientWidth")
    assert width == PHONE["width"]
    wider = driver.execute_script(
        "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
        "document.documentElement.clientWidth + 1 && e.getClientRects().length).map(e => e.id || e.className || e.tagName)")
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width, wider
    assert not wider


def copied_curl(driver, button: str) -> dict:
    """Clicks a "Copy curl" button and runs the command it shows, as a person would paste it
    into a shell with the key in CONSISTORY_API_KEY; answers the JSON it printed."""
    by_css(driver, button).click()
    command = by_css(driver, "#curl-text").text
    assert command.startswith("curl ") and "$CONSISTORY_API_KEY" in command and TOKEN not in command
    assert shutil.which("curl"), "curl is needed to run the copied command"
    ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "CONSISTORY_API_KEY": TOKEN})
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_without_a_key_the_page_asks_for_one_and_shows_the_apis_401_next_to_the_field(service, browser):
    browser.get(service + "/")
    assert "API key" in by_css(browser, "#key-form .hint").text
    assert console_errors(browser) == []  # no call was made without a key
    enter_key(browser, "cs_not-a-real-key")
    slot = by_css(browser, '#key-form [data-error-for="key"]')
    wait_until(browser, lambda d: slot.text, "the 401 next to the key field")
    assert slot.text == http().get(f"{service}/v1/subjects", timeout=30).json()["detail"]
    unexpected = [e for e in console_errors(browser) if not (e["source"] == "network" and " 401 " in e["message"])]
    assert unexpected == []


def test_the_style_shortcut_builds_the_prompts_the_cli_builds(service, browser):
    from consistory.cli.prompt_text import setting_prompt

    cases = [("A photo of", "cat", "in the park"), ("A photo of", "old wizard", "reading"),
             ("A photo of the", "dog", "on a sofa"), ("A watercolor of", "unicorn", "in a field"),
             ("A photo of", "hour glass", "on a desk"), ("A photo of", "Alice", "at home"),
             ("A photo of", "two dogs", "asleep"), ("A photo of", "puppies", "in the snow"),
             ("A photo of", "owl", ""), ("", "cat", "in the snow"), ("A photo of", "European bison", "at dawn"),
             ("A photo of", "glass", "on a table"), ("A photo of", "9 cats", "outside"), ("  A sketch of ", " apple ", " x ")]
    browser.get(service + "/")
    built = browser.execute_async_script(
        "const [cases, done] = arguments;"
        "import(new URL('static/storyboard/prompts.js', document.baseURI).href)"
        ".then(m => done(cases.map(c => m.settingPrompt(...c))), e => done(String(e)));", cases)
    assert built == [setting_prompt(*case) for case in cases]
    assert console_errors(browser) == []


def test_a_storyboard_from_subject_to_deletion(service, browser, tmp_path):
    from selenium.webdriver.support import expected_conditions as seen

    browser.get(service + "/")
    assert browser.title == "ConsiStory storyboard"
    enter_key(browser, TOKEN)
    wait_until(browser, lambda d: "None yet." in by_css(d, "#subject-list").text, "the empty subject list")
    assert browser.execute_script("return sessionStorage.getItem('consistory.apiKey')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0

    # A subject from a style and two settings; its anchors arrive with their progress shown.
    type_into(browser, "#subject-words", "cat")
    by_css(browser, "details[data-fill=anchor-prompts] summary").click()
    type_into(browser, "details[data-fill=anchor-prompts] [name=shortcut-settings]", "in the park\non the beach")
    by_css(browser, "details[data-fill=anchor-prompts] .fill").click()
    assert by_css(browser, "#anchor-prompts").get_property("value") == "A photo of a cat in the park\nA photo of a cat on the beach"
    by_css(browser, "#subject-form details.settings summary").click()
    type_into(browser, "#subject-form [name=seed]", "5")
    type_into(browser, "#subject-form [name=steps]", str(STEPS))
    # Every state a frame shows, however briefly: each text a `.state` element is given, read from
    # the mutation records (a burst of replayed events may set several before the observer runs).
    browser.execute_script("""
        window.states = [];
        const isState = node => node && node.nodeType === Node.ELEMENT_NODE && node.classList.contains('state');
        new MutationObserver(records => { for (const r of records) {
          if (r.type === 'characterData' && isState(r.target.parentNode)) window.states.push(r.target.data);
          for (const n of r.addedNodes) {
            if (n.nodeType === Node.TEXT_NODE && isState(r.target)) window.states.push(n.data);
            if (n.nodeType === Node.ELEMENT_NODE)
              [n, ...n.querySelectorAll('.state')].filter(isState).forEach(s => window.states.push(s.textContent));
          }
        }}).observe(document.getElementById('frames'), {subtree: true, childList: true, characterData: true});
    """)
    by_css(browser, "#create-subject").click()
    loaded_images(browser, 2)
    summary = by_css(browser, "#story-summary").text
    subject_id = re.search(r"id ([0-9a-f]{32})", summary).group(1)
    record = ok_json(api().get(f"{service}/v1/subjects/{subject_id}", timeout=30))
    assert record["prompts"] == ["A photo of a cat in the park", "A photo of a cat on the beach"]
    assert record["seeds"] == [5, 6] and record["config"]["num_inference_steps"] == STEPS
    assert any(re.fullmatch(rf"pass \d · step \d+ of {STEPS}", s) for s in browser.execute_script("return window.states"))
    wait_until(browser, lambda d: d.find_elements("css selector", f'#subject-list li[data-id="{subject_id}"]'),
               "the new subject in the list")

    # Two scenes, each appearing when its image is ready.
    type_into(browser, "#scene-prompts", "a photo of a cat in the snow\na cat reading a book")
    by_css(browser, "#add-scenes").click()
    loaded_images(browser, 4)
    captions = [e.text for e in browser.find_elements("css selector", "#frames .caption")]
    assert captions == ["A photo of a cat in the park", "A photo of a cat on the beach",
                        "a photo of a cat in the snow", "a cat reading a book"]
    sources = browser.execute_script("return [...document.querySelectorAll('#frames img')].map(i => i.src)")
    served = [http().get(url, timeout=REQUEST_TIMEOUT_S).content for url in sources]
    assert all(png.startswith(b"\x89PNG") for png in served)

    # Back later in the same tab: the key is still there, and opening the subject from the list
    # shows its story again.
    browser.refresh()
    item = f'#subject-list li[data-id="{subject_id}"]'
    wait_until(browser, lambda d: d.find_elements("css selector", item), "the subject list after a reload")
    assert not by_css(browser, "#story").is_displayed()
    by_css(browser, f"{item} button.open").click()
    loaded_images(browser, 4)
    assert "cat — A photo of a cat in the park" in by_css(browser, item).text

    # An invalid prompt: the API's own sentence, next to the field.
    bad = "a photo of a spaceship"
    type_into(browser, "#scene-prompts", bad)
    by_css(browser, "#add-scenes").click()
    slot = by_css(browser, '#scenes-form [data-error-for="prompts"]')
    wait_until(browser, lambda d: slot.text, "the 422 next to the prompts")
    answer = api().post(f"{service}/v1/jobs", json={"images": {"subject_id": subject_id, "prompts": [bad]}}, timeout=30)
    assert answer.status_code == 422 and slot.text == answer.json()["detail"]
    assert by_css(browser, "#scene-prompts").get_attribute("aria-invalid") == "true"
    assert browser.execute_script(LOADED_IMAGES) == 4  # and nothing else changed

    # "Copy curl" gives the request the page makes: run in a shell, it does the same.
    type_into(browser, "#scene-prompts", "a cat on a boat")
    assert slot.text == ""  # a changed field loses its error
    job = copied_curl(browser, "#scenes-form .curl")
    assert job["kind"] == "images" and job["subject_id"] == subject_id
    assert copied_curl(browser, "#curl-record") == record
    assert subject_id in copied_curl(browser, "#curl-list")["subject_ids"]

    # Downloads: a grid of the four images, and a zip of them with their prompts and seeds.
    downloads = tmp_path / "downloads"
    by_css(browser, "#download-grid").click()
    grid = pixels(wait_for_file(downloads, "story-*.png").read_bytes())
    tiles = [pixels(png) for png in served]
    size = tiles[0].shape[0]
    assert grid.shape == (size, 4 * size, 3)
    for i, tile in enumerate(tiles):
        assert np.array_equal(grid[:, i * size:(i + 1) * size], tile), f"grid tile {i}"
    by_css(browser, "#download-zip").click()
    with zipfile.ZipFile(wait_for_file(downloads, "story-*.zip")) as archive:
        assert archive.testzip() is None  # every CRC matches
        assert archive.namelist() == ["00-anchor.png", "01-anchor.png", "02-scene.png", "03-scene.png", "story.json"]
        assert [archive.read(n) for n in archive.namelist()[:4]] == served
        story = json.loads(archive.read("story.json"))
        assert story["subject_id"] == subject_id and [i["seed"] for i in story["images"]][:2] == [5, 6]

    # At a phone's width everything fits, and the page still shows the whole story.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    no_horizontal_overflow(browser)
    browser.save_screenshot(str(tmp_path / "storyboard-phone.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "storyboard.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("CONSISTORY_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)

    # Delete: "Keep it" keeps it; confirming deletes it.
    by_css(browser, "#delete-subject").click()
    wait_until(browser, lambda d: by_css(d, "#confirm-delete").get_property("open"), "the confirmation")
    by_css(browser, "#confirm-delete button[value=cancel]").click()
    assert api().get(f"{service}/v1/subjects/{subject_id}", timeout=30).status_code == 200
    by_css(browser, "#delete-subject").click()
    wait_until(browser, seen.element_to_be_clickable(by_css(browser, "#confirm-yes")), "the confirmation")
    by_css(browser, "#confirm-yes").click()
    wait_until(browser, lambda d: not d.find_elements("css selector", f'#subject-list li[data-id="{subject_id}"]'),
               "the subject gone from the list")
    assert not by_css(browser, "#story").is_displayed()
    assert api().get(f"{service}/v1/subjects/{subject_id}", timeout=30).status_code == 404

    # The only error the browser logged is the 422 this test asked for.
    errors = console_errors(browser)
    assert [e for e in errors if not (e["source"] == "network" and "v1/jobs" in e["message"] and " 422 " in e["message"])] == []
