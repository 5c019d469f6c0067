"""The chat page served at GET /, in a real headless browser (Debian's chromium + chromium-driver,
driven with selenium): type a message, watch the reply stream in, continue the conversation, stop
an answer mid-stream, start a new chat."""
import shutil

import pytest

from test_serve import Live, make_run_dir

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (requirements-dev.txt)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver (.ci/run does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Live(make_run_dir(tmp_path_factory.mktemp("run")), max_batch=4)
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # no selenium-manager download
    yield driver
    driver.quit()


def last_reply(browser):
    """(state, text, chunks) of the last assistant message on the page."""
    return browser.execute_script("""
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m ? [m.dataset.state, m.querySelector('.text').textContent, Number(m.dataset.chunks)] : null;""")


def wait_state(browser, states, seconds=60):
    WebDriverWait(browser, seconds).until(lambda d: (last_reply(d) or [None])[0] in states)
    return last_reply(browser)


def say(browser, text):
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def api_reply(live, messages, max_tokens):
    status, _, r = live.request("POST", "/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                                  "max_tokens": max_tokens})
    assert status == 200
    return r["choices"][0]["message"]["content"]


def test_chat_page_streams_replies_stops_and_resets(live, browser):
    browser.get(live.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "context 256" in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max_tokens", "30")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)

    # 1. a reply streams in: hold the model after a few tokens and see part of it on the page
    first = "你好，卡米！Where do you live?"
    want1 = api_reply(live, [{"role": "user", "content": first}], 30)
    live.gate.close(after=8)  # prefill + 7 decode steps, then the worker waits
    say(browser, first)
    WebDriverWait(browser, 60).until(lambda d: live.gate.waiting.is_set() and len(last_reply(d)[1]) > 0)
    state, partial, _ = last_reply(browser)
    assert state == "streaming" and want1.startswith(partial) and len(partial) < len(want1)
    assert not browser.find_element(By.ID, "stop").get_attribute("disabled")
    live.gate.open()
    state, text, chunks = wait_state(browser, {"done", "error"})
    assert (state, text) == ("done", want1) and chunks > 5
    assert "max tokens" in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text

    # 2. the second turn is answered with the whole conversation as context
    second = "And your pet?"
    want2 = api_reply(live, [{"role": "user", "content": first}, {"role": "assistant", "content": want1},
                             {"role": "user", "content": second}], 30)
    say(browser, second)
    assert tuple(wait_state(browser, {"done", "error"})[:2]) == ("done", want2)

    # 3. New chat forgets the conversation: the answer is the one-message answer
    browser.find_element(By.ID, "new").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    say(browser, second)
    want = api_reply(live, [{"role": "user", "content": second}], 30)
    assert tuple(wait_state(browser, {"done", "error"})[:2]) == ("done", want)

    # 4. Stop ends a long answer; the server notices the closed connection and frees the slot
    browser.find_element(By.ID, "new").click()
    el = browser.find_element(By.ID, "max_tokens")
    el.clear()
    el.send_keys("200")
    live.gate.close(after=4)
    say(browser, "Tell me a long story.")
    WebDriverWait(browser, 60).until(lambda d: live.gate.waiting.is_set() and len(last_reply(d)[1]) > 0)
    browser.find_element(By.ID, "stop").click()
    assert wait_state(browser, {"stopped", "done", "error"})[0] == "stopped"
    assert "(stopped)" in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    live.gate.open()
    live.wait_for("the stopped request's slot", lambda h: h["active"] == 0 and h["cancelled"] >= 1)
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
