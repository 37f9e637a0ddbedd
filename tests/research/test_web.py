"""`tokenmill research serve`: the API's errors, and the page end to end in headless Chromium (Playwright
driving Debian's /usr/bin/chromium; skipped, with the reason, where either is missing)."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.server.conftest import start_server, stop_server
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.research_loop import ResearchRun, ResearchSettings
from tokenmill_research.search_tools import CorpusSearch
from tokenmill_research.web.app import build_research_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def research_site(retriever, fake_endpoint):
    client = LLMClient(fake_endpoint.base_url, "fake")
    app = build_research_app(
        lambda on_event: ResearchRun(client, CorpusSearch(retriever), ResearchSettings(reflections=1), on_event),
        retriever.store.chunks)
    live = start_server(app, None)
    yield live.root
    stop_server(live)


def test_the_api_refuses_bad_input_with_the_servers_error_shape(research_site) -> None:
    with httpx.Client(base_url=research_site, timeout=30) as http:
        response = http.post("/api/research", json={"question": "x" * 3000})
        assert response.status_code == 400
        assert response.json()["error"] == {"message": "the question is 3000 characters; the limit is 2000",
                                            "type": "invalid_request_error", "param": "question", "code": None}
        response = http.post("/api/research", content=b"not json")
        assert (response.status_code, response.json()["error"]["param"]) == (400, "question")
        response = http.post("/api/research", content=b"x" * (65 << 10))
        assert response.status_code == 413
        assert http.get("/api/research/999/events").status_code == 404
        response = http.get("/api/chunks/123456")
        assert (response.status_code, response.json()["error"]["message"]) == (404, "no chunk 123456 in the index")


def test_the_event_stream_ends_with_the_report(research_site) -> None:
    with httpx.Client(base_url=research_site, timeout=60) as http:
        events_url = http.post("/api/research", json={"question": "How do I read a file line by line?"}).json()["events"]
        with http.stream("GET", events_url) as stream:
            kinds = [line.split(": ", 1)[1] for line in stream.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "status" and kinds[1] == "plan" and kinds[-1] == "report"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_page_asks_shows_progress_and_opens_a_citation(research_site, retriever) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(research_site + "/")
            page.fill("#question", "How do I read a file line by line?")
            page.click("#submit")
            page.wait_for_selector("#report a.cite", timeout=60_000)
            progress = page.locator("#progress li").all_text_contents()
            assert progress[0] == "planning" and progress[-1].startswith("report written in ")
            assert any(line.startswith("judged ") for line in progress)
            assert page.locator("#plan li").count() == 3  # Answer + the scripted plan's two sections
            link = page.locator("#report a.cite").first
            chunk_id = int(link.get_attribute("data-chunk"))
            link.click()
            page.wait_for_selector("#passage-text", timeout=10_000)
            assert page.locator("#passage-text").text_content() == retriever.store.chunks[chunk_id].text
        finally:
            browser.close()
