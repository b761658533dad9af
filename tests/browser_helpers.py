"""A headless Chromium from the system packages, driven by Selenium through the system
chromedriver. Both binaries are named explicitly, so Selenium Manager never looks for (or
downloads) a browser or a driver."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "apt-get install chromium chromium-driver (what .ci/run does)"
WAIT_S = 180  # the longest any step of a browser test waits (images on a shared 2-core CPU)


def system_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver. Missing ones skip the test on a developer's machine,
    and fail it in CI (CI=true), where the browser suite must run."""
    chromium = next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path)
    message = f"{missing} not found on PATH; install them with {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def start_chromium(downloads: Path, width: int = 1280, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = system_browser()
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-proxy-server", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.ignore_local_proxy_environment_variables()  # chromedriver is on loopback: never via a proxy
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def wait_until(driver, condition: Callable[[Any], Any], what: str, timeout_s: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition, message=f"waited {timeout_s} s for {what}")


def console_errors(driver) -> list[dict]:
    """What the page logged at error level since the last call (reading empties the log)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for_file(folder: Path, pattern: str, timeout_s: float = 60) -> Path:
    """A finished download (Chromium writes `.crdownload` until it is complete)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if found:
            return found[0]
        time.sleep(0.2)
    raise TimeoutError(f"no {pattern} in {folder} after {timeout_s} s")
