"""The web chat page in a real browser (headless Chromium driven by Selenium): a person's path through it,
typing the API key, uploading an image, asking, and watching the streamed answer land in the log.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`; `make install` does
it as root); without them the test is skipped. Selenium is pointed at both binaries, so Selenium Manager
never tries to download a browser or a driver."""
from __future__ import annotations

import os

import pytest

from conftest import KEY, png  # noqa: E402  (fixture: server)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_MISSING = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]

pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"{' and '.join(_MISSING)} not found: install the Debian "
                                "packages `chromium chromium-driver` (apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_uploads_an_image_and_streams_the_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.png"
    image.write_bytes(png((48, 48)))
    wait = WebDriverWait(browser, 90, poll_frequency=0.1)
    browser.get(server + "/")
    assert browser.title == "MiniGPT-4"

    browser.find_element(By.ID, "key").send_keys(KEY)
    # greedy and short, set with the keyboard as a person would: Home = the slider's minimum
    browser.find_element(By.ID, "temperature").send_keys(Keys.HOME)
    browser.find_element(By.ID, "maxtokens").send_keys(Keys.HOME + Keys.ARROW_RIGHT * 15)
    assert browser.find_element(By.ID, "tv").text == "0" and browser.find_element(By.ID, "mv").text == "16"

    browser.find_element(By.ID, "file").send_keys(str(image))
    # the page reads the file asynchronously: its preview and a user bubble appear when the image is ready
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed()
               and any("red.png" in b.text for b in d.find_elements(By.CSS_SELECTOR, ".msg.user")))

    browser.find_element(By.ID, "text").send_keys("What colour is this square?")
    browser.find_element(By.ID, "send").click()

    def answered(d):
        errors = d.find_elements(By.CSS_SELECTOR, ".msg.error")
        if errors:
            raise AssertionError(f"the page shows an error: {errors[0].text}")
        done = [b for b in d.find_elements(By.CSS_SELECTOR, ".msg.assistant") if b.get_attribute("data-done") == "1"]
        return done[0] if done and done[0].text.strip() else False

    bubble = wait.until(answered, message="no finished, non-empty assistant answer on the page")
    assert bubble.text.strip()
    users = [b.text for b in browser.find_elements(By.CSS_SELECTOR, ".msg.user")]
    assert users == ["[image: red.png]", "What colour is this square?"], users
    assert browser.find_element(By.ID, "send").is_enabled()  # the page is ready for the next turn
