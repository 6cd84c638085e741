"""The live page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) opens /dashboard on a live server under load. The map draws every block, request rows
appear and leave, the charts update, a click shows a request's timeline, and the console stays free
of errors. A screenshot is saved under test-artifacts/ (not committed)."""

from __future__ import annotations

import threading

import pytest

from tests.browser import ARTIFACTS, console_errors, headless_chromium, needs_chromium, wait_for
from tests.server.test_server_support import API_KEY, launch_server

pytestmark = needs_chromium


@pytest.mark.slow
def test_dashboard_in_headless_chromium_under_load(tiny_llama_dir):
    from selenium.webdriver.common.by import By

    with launch_server(str(tiny_llama_dir), "--num-blocks", "96", "--block-size", "4", "--max-num-seqs", "4",
                       "--dashboard-interval", "0.2") as server:
        stop = threading.Event()
        answered: list[int] = []

        def load() -> None:
            i = 0
            while not stop.is_set():
                r = server.post("/v1/completions", json={"model": server.model, "prompt": f"{i} Tell me a story",
                                                         "max_tokens": 48, "temperature": 0, "ignore_eos": True})
                answered.append(r.status_code)
                i += 1

        workers = [threading.Thread(target=load) for _ in range(6)]
        driver = headless_chromium()
        try:
            driver.get(f"{server.base_url}/dashboard?api_key={API_KEY}")
            for w in workers:
                w.start()
            blockmap = driver.find_element(By.ID, "blockmap")
            wait_for(lambda: int(blockmap.get_attribute("data-updates") or 0) >= 3, 60, "three map updates")
            assert blockmap.get_attribute("data-blocks") == "96" and blockmap.get_attribute("data-cells") == "96"
            # the tables are redrawn at every snapshot: read them in one script, never through stale elements
            running = "#queues table[data-queue=running] tr.req"
            finished = "#queues table[data-queue=finished] tr.req"

            def ids(selector: str) -> set[str]:
                return set(driver.execute_script(
                    "return [...document.querySelectorAll(arguments[0])].map((e) => e.dataset.id)", selector))

            live = wait_for(lambda: ids(running), 60, "running request rows")
            chart = driver.find_element(By.CSS_SELECTOR, 'canvas[data-chart="tokens/s"]')
            points = int(wait_for(lambda: chart.get_attribute("data-points"), 30, "the first chart"))
            wait_for(lambda: int(chart.get_attribute("data-points")) > points, 30, "the charts to move on")
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "dashboard-under-load.png"))
            live = ids(running) or live  # the latest running rows: they finish after the load stops
            stop.set()
            for w in workers:
                w.join(60)
            # the rows leave once their requests finish, and show up among the finished ones
            wait_for(lambda: not ids(running), 60, "running rows to leave")
            assert wait_for(lambda: live & ids(finished), 30, "a request seen running among the finished")
            picked = driver.execute_script("const row = document.querySelector(arguments[0]); row.click(); "
                                           "return row.dataset.id", finished)
            timeline = driver.find_element(By.ID, "timeline")
            wait_for(lambda: timeline.get_attribute("data-request") == picked, 30, "the request timeline")
            assert "prefill chunks" in driver.find_element(By.ID, "timeline-figures").text
            errors = console_errors(driver)
            assert not errors, errors
            driver.save_screenshot(str(ARTIFACTS / "dashboard-timeline.png"))
        finally:
            stop.set()
            driver.quit()
            for w in workers:
                if w.is_alive():
                    w.join(60)
        assert answered and set(answered) == {200}
