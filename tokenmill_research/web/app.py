"""The research web page's server: the page, POST /api/research, the run's events over SSE, the passages.

Errors use the OpenAI-shaped body of tokenmill's server (tokenmill.server.errors), with 4xx statuses for
bad input: an empty or oversized question, an unknown run or chunk.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from tokenmill.server.errors import error_response
from tokenmill_research.errors import ResearchError
from tokenmill_research.research_loop import ResearchRun, check_question
from tokenmill_research.web.jobs import BusyError, JobTable

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 << 10
SSE_POLL_S = 0.5


def build_research_app(run_factory, store_chunks: dict) -> FastAPI:
    """run_factory(on_event) -> ResearchRun; store_chunks: the index's chunks by id (the passages served)."""
    app = FastAPI(title="tokenmill research")
    jobs = JobTable(lambda question, on_event: run_factory(on_event).run(question))

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if "/" in name or not path.is_file():
            return error_response(404, f"no static file {name[:80]!r}", param="name")
        return FileResponse(path)

    @app.post("/api/research")
    async def ask(request: Request):
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error_response(413, f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            question = json.loads(body).get("question")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return error_response(400, "the body must be a JSON object with a 'question' string", param="question")
        if not isinstance(question, str):
            return error_response(400, "'question' must be a string", param="question")
        try:
            job = jobs.start(check_question(question))
        except BusyError as exc:
            return error_response(429, str(exc))
        except ResearchError as exc:
            return error_response(400, str(exc), param="question")
        return JSONResponse({"id": job.job_id, "events": f"/api/research/{job.job_id}/events"})

    @app.get("/api/research/{job_id}/events")
    async def events(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            return error_response(404, f"no research run {job_id[:40]!r}", param="job_id")

        async def stream():
            sent = 0
            while True:
                new = await asyncio.to_thread(job.wait_beyond, sent, SSE_POLL_S)
                for kind, data in new:
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                sent += len(new)
                if job.done and sent == len(job.events):
                    return
                if not new:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/chunks/{chunk_id}")
    def chunk(chunk_id: int) -> Any:
        found = store_chunks.get(chunk_id)
        if found is None:
            return error_response(404, f"no chunk {chunk_id} in the index", param="chunk_id")
        return {"id": found.chunk_id, "label": found.label, "context": found.context, "source": found.source,
                "text": found.text}

    return app
