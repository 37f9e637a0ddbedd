"""Research runs started from the web page: each runs on its own thread and appends its events to a list
that any number of SSE streams replay and follow."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill_research.errors import ResearchError

MAX_RUNNING = 2  # the endpoint is shared: more reports at once only slow each other down
MAX_KEPT = 50  # finished runs kept for late or repeated SSE readers; the oldest are dropped


class BusyError(ResearchError):
    """MAX_RUNNING reports are being written already."""


@dataclass
class Job:
    job_id: str
    question: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    done: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, kind: str, data: dict[str, Any]) -> None:
        with self.changed:
            self.events.append((kind, data))
            self.done = self.done or kind in ("report", "error")
            self.changed.notify_all()

    def wait_beyond(self, count: int, timeout_s: float) -> list[tuple[str, dict[str, Any]]]:
        """The events after the first `count`, waiting up to timeout_s for one to arrive."""
        with self.changed:
            if len(self.events) <= count and not self.done:
                self.changed.wait(timeout_s)
            return self.events[count:]


class JobTable:
    def __init__(self, run: Callable[[str, Callable[[str, dict[str, Any]], None]], Any]) -> None:
        self._run = run  # (question, on_event) -> report; raises ResearchError on bad input or endpoint
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(self, question: str) -> Job:
        with self._lock:
            running = sum(not j.done for j in self._jobs.values())
            if running >= MAX_RUNNING:
                raise BusyError(f"{running} reports are being written; the limit is {MAX_RUNNING}, try again soon")
            job = Job(str(next(self._ids)), question)
            self._jobs[job.job_id] = job
            for old in [j for j in self._jobs.values() if j.done][:max(0, len(self._jobs) - MAX_KEPT)]:
                del self._jobs[old.job_id]
        threading.Thread(target=self._work, args=(job,), daemon=True, name=f"research-{job.job_id}").start()
        return job

    def _work(self, job: Job) -> None:
        try:
            self._run(job.question, job.add)
        except ResearchError as exc:
            job.add("error", {"message": str(exc)})
        except Exception as exc:  # a bug must end the stream with a message, not leave the page waiting
            job.add("error", {"message": f"internal error: {type(exc).__name__}: {exc}"})
