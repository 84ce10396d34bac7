"""Headless Chromium for the tests that look at pages as users do (Debian's `chromium` and
`chromium-driver`, driven by Selenium). Installed with apt-get when missing and running as root
(CI is); otherwise the test fails saying how to install them."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Iterator

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts (no network here).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")


def ensure_chromium() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver: "
                           "run `sudo apt-get install -y chromium chromium-driver`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


@contextlib.contextmanager
def chromium() -> Iterator["object"]:
    """A Selenium WebDriver on headless Chromium that keeps the page's console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="saliency-atlas-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


IMAGES_LOADED = """return Array.from(document.images).map(i => [i.alt || i.src.slice(0, 40), i.complete, i.naturalWidth]);"""


def broken_images(driver) -> list:
    """The page's images that did not load (naturalWidth 0), as (alt or source start, complete, width)."""
    return [i for i in driver.execute_script(IMAGES_LOADED) if not (i[1] and i[2] > 0)]


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
