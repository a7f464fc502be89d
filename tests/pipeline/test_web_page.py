"""The web page (services/web/static) in Debian's headless Chromium, driven by Selenium, against the
whole running stack: sign in, a streamed answer, stop, a thumbs-up, a ranking of 3 candidates (two tied) that
lands in the feedback dataset, a moderation notice, a conversation opened from the list and
deleted. Screenshots of each step go to $WEB_SCREENSHOTS_DIR (default var/screenshots/web, so a
test run leaves the checkout clean); `WEB_SCREENSHOTS_DIR=docs/web` refreshes the ones the README
shows."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import Stack
from services.feedback import dataset

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / os.environ.get("WEB_SCREENSHOTS_DIR", "var/screenshots/web")
# The test stack's feedback sink writes the default dataset (services/feedback/config.py).
FEEDBACK_DIR = ROOT / os.environ.get("COLLOQUY_VAR", "var") / "feedback"


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path and shutil.which("chromium"), "chromium and chromium-driver are missing: run make setup"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    driver.get(stack.web + "/")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    print(f"[page] screenshot {SHOTS / name}.png", flush=True)


def wait(predicate, timeout: float = 150.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, name)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def send(driver, text: str, answers: int = 1, max_tokens: int | None = None) -> object:
    from selenium.webdriver.support.ui import Select
    Select(by_id(driver, "candidates")).select_by_value(str(answers))
    by_id(driver, "max-tokens").clear()
    if max_tokens:
        by_id(driver, "max-tokens").send_keys(str(max_tokens))
    box = by_id(driver, "message")
    box.clear()
    box.send_keys(text)
    by_id(driver, "send").click()
    return css(driver, ".turn")[-1]


def statuses(turn) -> list[str]:
    from selenium.webdriver.common.by import By
    return [s.text for s in turn.find_elements(By.CSS_SELECTOR, ".answer .status")]


def test_1_a_bad_key_is_refused_and_a_good_one_signs_in(browser) -> None:
    by_id(browser, "api-key").send_keys("not-a-key")
    by_id(browser, "sign-in-button").click()
    error = wait(lambda: by_id(browser, "sign-in-error").text, 20, "the sign-in error")
    assert "API key" in error
    shot(browser, "01-sign-in-refused")
    by_id(browser, "api-key").clear()
    by_id(browser, "api-key").send_keys("colloquy-dev-key")
    by_id(browser, "sign-in-button").click()
    wait(lambda: by_id(browser, "chat").is_displayed(), 20, "the chat view")
    shot(browser, "02-signed-in")


def test_2_an_answer_streams_in_and_can_be_rated(browser) -> None:
    from selenium.webdriver.common.by import By
    turn = send(browser, "Write a short poem about the sea.", max_tokens=80)
    text = turn.find_element(By.CSS_SELECTOR, ".answer .text")
    lengths: set[int] = set()
    while not any(s in ("done", "cut at the length limit", "stopped by moderation") for s in statuses(turn)):
        lengths.add(len(text.text))
        if len(lengths) == 3 and not (SHOTS / "03-streaming.png").exists():
            shot(browser, "03-streaming")
        time.sleep(0.02)
        assert len(lengths) < 100_000
    assert len({n for n in lengths if n > 0}) >= 2, f"the answer did not arrive in pieces: {sorted(lengths)}"
    wait(lambda: css(browser, ".thumbs-up"), 10, "the rating buttons")
    css(browser, ".answer .comment")[-1].send_keys("nice rhythm")
    css(browser, ".thumbs-up")[-1].click()
    wait(lambda: css(browser, ".feedback-status")[-1].text == "Thanks for the feedback", 20, "the rating's answer")
    shot(browser, "04-rated")


def test_3_stop_ends_an_answer_mid_stream(browser) -> None:
    from selenium.webdriver.common.by import By
    turn = send(browser, "Write a very long story about a dragon who learns to cook.")
    text = turn.find_element(By.CSS_SELECTOR, ".answer .text")
    wait(lambda: len(text.text) > 0, 150, "the first words")
    by_id(browser, "stop").click()
    wait(lambda: statuses(turn) == ["stopped"], 10, "the stopped status")
    stopped_at = text.text
    time.sleep(1.5)
    assert text.text == stopped_at, "text kept arriving after Stop"
    assert not by_id(browser, "stop").is_displayed()
    shot(browser, "05-stopped")


def test_4_three_candidates_are_ranked_with_a_tie_and_the_ranking_reaches_the_dataset(browser) -> None:
    from selenium.webdriver.common.by import By
    css(browser, "#new-chat")[0].click()
    turn = send(browser, "Name a fruit.", answers=3, max_tokens=32)

    def ready() -> bool:
        if by_id(browser, "chat-error").text:
            shot(browser, "failed-04")
            raise AssertionError(f"the page says: {by_id(browser, 'chat-error').text}")
        return len(turn.find_elements(By.CSS_SELECTOR, ".rank")) == 3
    try:
        wait(ready, 240, "three answers ready to rank")
    except AssertionError:
        shot(browser, "failed-04")
        raise AssertionError(f"no ranking after 240 s; statuses {statuses(turn)}, page: "
                             f"{turn.get_attribute('outerHTML')[:1500]}") from None
    cards = turn.find_elements(By.CSS_SELECTOR, ".answer")
    assert [c.get_attribute("data-index") for c in cards] == ["0", "1", "2"]
    assert all(s in ("done", "cut at the length limit", "stopped by moderation") for s in statuses(turn))
    texts = [c.get_attribute("data-text") for c in cards]  # what the page received, before Markdown
    # best first, the second as good as the first: 2 = 0 > 1
    cards[2].find_element(By.CSS_SELECTOR, ".rank").click()
    cards[0].find_element(By.CSS_SELECTOR, ".tie").click()
    cards[1].find_element(By.CSS_SELECTOR, ".rank").click()
    turn.find_element(By.CSS_SELECTOR, ".submit-ranking").click()
    wait(lambda: "Ranking sent" in turn.find_element(By.CSS_SELECTOR, ".rank-bar .status").text, 20, "the ranking")
    assert turn.find_element(By.CSS_SELECTOR, ".rank-bar .status").text == \
        "Ranking sent: answer 3 = answer 1 > answer 2"
    shot(browser, "06-ranked")
    conv, turn_index = turn.get_attribute("data-conversation"), int(turn.get_attribute("data-turn"))

    def ranked() -> list[dict]:
        rows = dataset.read(FEEDBACK_DIR).to_pylist()
        return [r for r in rows if r["conversation_id"] == conv and r["turn_index"] == turn_index
                and r["kind"] == "ranking"]
    [row] = wait(ranked, 90, "the ranking in the feedback dataset")
    assert row["ranking"] == [2, 0, 1] and len(row["answers"]) == 3 and row["source"] == "human"
    assert row["ranking_tied_with_next"] == [True, False]
    assert row["answers"] == texts, "the dataset's candidates differ from what the page showed"
    print(f"[page] dataset row: conversation {conv} turn {turn_index} ranking {row['ranking']}", flush=True)


def test_5_a_refused_message_shows_the_moderation_notice(browser) -> None:
    from selenium.webdriver.common.by import By
    css(browser, "#new-chat")[0].click()
    turn = send(browser, "Immigrants are subhuman parasites and I want to hurt them all.")
    wait(lambda: statuses(turn) == ["stopped by moderation"], 150, "the moderation verdict")
    notice = turn.find_element(By.CSS_SELECTOR, ".answer .notice").text
    assert notice, "the refusal was not shown"
    wait(lambda: by_id(browser, "send").is_enabled(), 20, "the end of the stream")
    assert not turn.find_elements(By.CSS_SELECTOR, ".thumbs-up"), "a refused message offers feedback it cannot take"
    shot(browser, "07-moderation-notice")


def test_6_conversations_are_listed_opened_and_deleted(browser, stack: Stack) -> None:
    import httpx2
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def listed() -> list[tuple[str, str, str]]:
        """(title, conversation id, class) of the list's items, most recent first, read in one step
        (the page rebuilds the list after each answer, so element handles go stale)."""
        return [tuple(row) for row in browser.execute_script(
            "return [...document.querySelectorAll('#conversation-list li')].map("
            "li => [li.querySelector('.open').textContent, li.dataset.id, li.className])")]

    def newest(title: str) -> tuple[str, str] | None:
        """(id, class) of the most recent conversation with this title: this session's (the dev
        user may have older ones with the same first message)."""
        return next(((conv, cls) for t, conv, cls in listed() if t == title), None)

    def click(selector: str) -> None:
        for _ in range(20):
            try:
                browser.find_element(By.CSS_SELECTOR, selector).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"{selector} kept going stale")

    def shown() -> list[str]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#messages .user')].map(e => e.textContent)")

    poem = "Write a short poem about the sea."
    wait(lambda: newest(poem) and newest("Name a fruit."), 20, "the earlier conversations in the list")
    conv = newest(poem)[0]
    click(f'#conversation-list li[data-id="{conv}"] .open')
    wait(lambda: shown()[:1] == [poem] and "current" in newest(poem)[1], 20, "the opened conversation")
    shot(browser, "08-conversation-opened")
    click(f'#conversation-list li[data-id="{conv}"] .delete')
    wait(lambda: conv not in [c for _, c, _ in listed()]
         and by_id(browser, "list-status").text == "Conversation deleted", 30, "the conversation gone from the list")
    assert not shown(), "the deleted conversation is still shown"
    shot(browser, "09-conversation-deleted")
    gone = httpx2.get(f"{stack.web}/v1/conversations/{conv}", headers={"Authorization": "Bearer colloquy-dev-key"})
    assert gone.status_code == 404, gone.text


def test_7_a_503_with_retry_after_is_sent_again_after_the_wait(browser) -> None:
    """The gateway answers 503 + Retry-After while a conversation's previous turn is still being
    saved. Provoking that lag on demand is not possible here, so the page's first POST gets that
    answer from a wrapped `fetch` (the text is the gateway's); the resend goes to the real stack."""
    css(browser, "#new-chat")[0].click()
    browser.execute_script("""
      const real = window.fetch; let refused = 0;
      window.fetch = (url, opts) => (String(url).endsWith('/v1/chat/completions') && refused++ === 0)
        ? Promise.resolve(new Response(JSON.stringify({error: {message:
            "this conversation's history is still being saved; retry in a few seconds"}}),
            {status: 503, headers: {'Retry-After': '1', 'Content-Type': 'application/json'}}))
        : real(url, opts);""")
    turn = send(browser, "Name a color.", max_tokens=8)
    wait(lambda: "retrying in 1s" in by_id(browser, "chat-error").text, 10, "the retry notice")
    wait(lambda: any(s in ("done", "cut at the length limit") for s in statuses(turn)), 150, "the resent answer")
    assert by_id(browser, "chat-error").text == "", "the retry notice stayed after the answer"
    assert browser.execute_script("return document.querySelectorAll('#messages .user').length") == 1
