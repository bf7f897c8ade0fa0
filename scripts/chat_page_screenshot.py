"""The README's picture of the chat page (docs/chat-page.png): the built-in demo model asked
about an image of its own kind, in headless Chromium (as tests/web_ui.py drives it). One
question: the demo model was trained on single questions, and a second turn with a second
image is outside what it learned.

    target/test-venv/bin/python scripts/chat_page_screenshot.py target/release/ocellus docs/chat-page.png
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

binary, out = sys.argv[1:3]
with socket.socket() as probe:  # a free loopback port
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
base = f"http://127.0.0.1:{port}"
data = tempfile.mkdtemp()
subprocess.run([binary, "demo-data", "--out", data, "--train", "2", "--test", "0", "--seed", "11"], check=True)
server = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "--port", str(port)])
options = webdriver.ChromeOptions()
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,480"]:
    options.add_argument(argument)
options.binary_location = os.environ.get("OCELLUS_CHROMIUM", "/usr/bin/chromium")
driver = webdriver.Chrome(service=Service(os.environ.get("OCELLUS_CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
try:
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(base + "/health").status == 200:
                break
        except OSError:
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.2)
    driver.get(base + "/")
    wait = WebDriverWait(driver, 30)
    find = lambda selector: driver.find_element(By.CSS_SELECTOR, selector)
    wait.until(lambda d: find("#model").get_attribute("data-loaded") == "true")
    find("#settings summary").click()
    find("#temperature").send_keys("0")
    find("#settings summary").click()
    for i, question in enumerate(["What shape is this?"]):
        find("#files").send_keys(os.path.join(data, "images", f"train-{i + 1}.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments figure"))
        find("#prompt").send_keys(question)
        find("#send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.message.assistant[data-state="done"]')) == i + 1)
    driver.save_screenshot(out)
    print("wrote", out)
finally:
    driver.quit()
    server.terminate()
    server.wait()
