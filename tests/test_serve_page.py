"""The chat page at / in headless Chromium (Debian's `chromium`): load it, give the key,
ask, and find the streamed answer in the DOM. Chromium is driven over the DevTools
protocol on a pipe (--remote-debugging-pipe), so nothing beyond the browser is needed."""

import json
import os
import select
import shutil
import subprocess
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from rustgpt.generation import chat_prompt, generate  # noqa: E402
from rustgpt.serve import create_app  # noqa: E402
from tests.serving import Running, tiny_model  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
KEY = "page-key"


class Browser:
    """Headless Chromium with one page, driven through DevTools messages on fds 3 and 4."""

    def __init__(self, profile) -> None:
        to_chrome, self._in = os.pipe()
        self._out, from_chrome = os.pipe()

        def fds():  # the child reads commands on fd 3 and writes answers on fd 4
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.session = b"", 0, None

    def send(self, method: str, timeout: float = 20, **params) -> dict:
        """One command's result (to the page's session once attached)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._out], [], [], left)[0], \
                    f"Chromium did not answer {method}"
                chunk = os.read(self._out, 65536)
                assert chunk, "Chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        """The first value of `expression` that is not null (polled)."""
        deadline = time.monotonic() + timeout
        while (value := self.js(expression)) is None:
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._in)
        os.close(self._out)


LAST_ANSWER = """(() => {
  const answers = document.querySelectorAll('.msg.assistant');
  const last = answers[answers.length - 1];
  return last && last.dataset.done && answers.length === %d ? last.textContent : null;
})()"""


def ask(browser, question, nth):
    browser.js(f"document.getElementById('prompt').value = {json.dumps(question)}; "
               f"document.getElementById('form').requestSubmit()")
    return browser.wait_for(LAST_ANSWER % nth)


def test_the_chat_page_streams_answers(tmp_path):
    model = tiny_model(64)
    browser = Browser(tmp_path / "profile")  # forked before the server's threads start
    running = None
    try:
        running = Running(create_app(model, api_key=KEY))
        browser.open(running.url + "/")
        browser.wait_for("document.readyState === 'complete' && "
                         "document.getElementById('send') !== null || null")
        error = ask(browser, "w1 w2?", 1)  # no key yet: the server's 401, shown
        assert error.startswith("Error: missing or wrong API key")
        browser.js(f"const key = document.getElementById('key'); key.value = {json.dumps(KEY)};"
                   f" key.dispatchEvent(new Event('change'))")
        prompt = chat_prompt(model, [("user", "w1 w2?")])
        room = 64 - len(model.tokenizer.encode(prompt)) + 1  # the server's [generation]
        expected = generate(model, prompt, raw=True, max_tokens=room)  # defaults: greedy
        assert ask(browser, "w1 w2?", 2) == expected
        stats = browser.js("document.getElementById('stats').textContent")
        assert stats.startswith(f"{room} tokens, ") and "tokens/s" in stats
        ask(browser, "w3", 3)  # the conversation goes on: the page keeps it
        assert browser.js("messages.map((m) => m.role).join()") == \
            "user,assistant,user,assistant"
    finally:
        browser.close()
        if running is not None:
            running.close()
