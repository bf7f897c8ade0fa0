"""The chat page in a real browser (Debian's Chromium, driven by Selenium).

    python tests/web_ui.py BASE_URL API_KEY IMAGE_PNG EXPECTED_ANSWER BROKEN_FILE [SCREENSHOT_PNG]

Run by tests/web_ui.rs, which starts the server and computes EXPECTED_ANSWER through the
API; exits non-zero on any failure.
"""

import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base_url, api_key, image_path, expected, broken_path = sys.argv[1:6]
screenshot = sys.argv[6] if len(sys.argv) > 6 else None

options = webdriver.ChromeOptions()
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,760"]:
    options.add_argument(argument)
options.binary_location = os.environ.get("OCELLUS_CHROMIUM", "/usr/bin/chromium")
driver = webdriver.Chrome(service=Service(os.environ.get("OCELLUS_CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
wait = WebDriverWait(driver, 30)
find = lambda selector: driver.find_element(By.CSS_SELECTOR, selector)


def metric(name):
    text = urllib.request.urlopen(base_url + "/metrics").read().decode()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else None


def wait_for_metric(name, value):
    deadline = time.time() + 10
    while metric(name) != value:
        assert time.time() < deadline, f"{name} never reached {value}: {metric(name)}"
        time.sleep(0.05)


def last_answer():
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def ask(text, files=()):
    for path in files:
        find("#files").send_keys(path)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments figure")) == len(files))
    count = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    find("#prompt").send_keys(text)
    find("#send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == count + 1)
    return last_answer()


def settle(answer):
    wait.until(lambda d: answer.get_attribute("data-state") in ("done", "stopped", "error"))
    return answer.get_attribute("data-state")


try:
    driver.get(base_url + "/")
    # The server needs a key: the page says so, then lists the model once it has one.
    wait.until(lambda d: "401" in find("#notice").text)
    find("#settings summary").click()
    find("#api-key").send_keys(api_key)
    driver.execute_script("document.querySelector('#api-key').dispatchEvent(new Event('change'))")
    wait.until(lambda d: find("#model").get_attribute("data-loaded") == "true")
    assert find("#notice").get_attribute("hidden") is not None, find("#notice").text
    find("#temperature").send_keys("0")
    find("#max-tokens").send_keys("12")

    # An image question: the streamed answer is the API's greedy answer.
    answer = ask("What is in this picture?", [image_path])
    assert settle(answer) == "done", answer.text
    assert answer.get_attribute("data-raw") == expected, (answer.get_attribute("data-raw"), expected)
    assert driver.find_elements(By.CSS_SELECTOR, ".message.user img"), "the image is shown with the question"
    if screenshot:
        find("#settings summary").click()
        driver.save_screenshot(screenshot)
        find("#settings summary").click()

    # Stop mid-stream: the server's running sequences go back to 0.
    find("#max-tokens").clear()
    find("#max-tokens").send_keys("7000")
    find("#extra").send_keys('{"ignore_eos": true}')
    answer = ask("Talk.")
    # Tokens on the page while the server still generates.
    wait.until(lambda d: answer.get_attribute("data-raw") and metric("ocellus_running_sequences") == 1.0)
    find("#stop").click()
    assert settle(answer) == "stopped"
    wait_for_metric("ocellus_running_sequences", 0.0)
    wait_for_metric("ocellus_kv_cache_used_blocks", 0.0)
    find("#extra").clear()
    find("#max-tokens").clear()
    find("#max-tokens").send_keys("4")

    # A broken image: the API's 400 as it sent it.
    answer = ask("And this one?", [broken_path])
    assert settle(answer) == "error"
    error = answer.find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("400 invalid_image:"), error

    # The conversation goes on after an error (the refused question is not resent).
    answer = ask("Hello")
    assert settle(answer) == "done", answer.find_element(By.CSS_SELECTOR, ".body").text

    # Markdown is rendered, and nothing in an answer becomes markup.
    html = driver.execute_script(
        "return window.ocellus.renderMarkdown(arguments[0])",
        "# Title\n\n**bold** and `code` <img src=x onerror=alert(1)>\n\n```python\nprint('<b>')\n```\n- one\n- two",
    )
    for piece in ["<strong>bold</strong>", "<code>code</code>", "&lt;img src=x onerror=alert(1)&gt;",
                  "<pre><code>print(&#39;&lt;b&gt;&#39;)</code></pre>", "<ul><li>one</li><li>two</li></ul>"]:
        assert piece in html, (piece, html)
    assert "<img" not in html and "<b>" not in html, html
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"] and "400" not in e["message"]]
    assert not errors, errors
    print("web ui ok")
finally:
    driver.quit()
