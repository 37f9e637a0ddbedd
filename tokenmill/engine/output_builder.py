"""Per-request output state: detokenized text, logprobs and finish reasons of the n samples.

A step's output is built in O(what it carries): a delta hands over the sample's pending lists without
copying them, and only cumulative / final outputs copy the history (the caller asked for all of it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.request import Request
from tokenmill.core.sched_io import TokenLogprobs
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.outputs import CompletionOutput, Logprob, LogprobsDict, RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class _Sample:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None  # owns the full text (output_text) of every kind
    # Delta requests: the ids, logprobs and text pieces not yet handed out. Other kinds: every id and
    # logprob so far (text_pieces stays empty; the detokenizer has the text).
    token_ids: list[int] = field(default_factory=list)
    text_pieces: list[str] = field(default_factory=list)
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    finish_sent: bool = False

    @property
    def has_news(self) -> bool:
        """Something a delta output has not carried yet."""
        return bool(self.token_ids) or (self.finish_reason is not None and not self.finish_sent)

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer is not None else ""


class RequestGroup:
    """One user request: its prompt and its n samples (each a scheduler Request)."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.kind = params.output_kind
        self.samples: dict[str, _Sample] = {}  # in index order: add_child is called for 0 .. n-1
        self._first_sent = False  # delta: the prompt fields went out with the first output
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.prompt_logprobs: list[LogprobsDict | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_token_ids)

    def add_child(self, index: int, request: Request) -> None:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                self.prompt_token_ids,
                skip_special_tokens=self.params.skip_special_tokens,
                stop=list(self.params.stop),
                include_stop_str_in_output=self.params.include_stop_str_in_output,
            )
        sample = _Sample(index, request, detokenizer)
        if self.params.logprobs is not None:
            sample.logprobs, sample.cumulative_logprob = [], 0.0
        self.samples[request.request_id] = sample

    def child_ids(self) -> list[str]:
        return list(self.samples)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())

    def set_prompt_logprobs(self, start_pos: int, entries: list[TokenLogprobs]) -> None:
        """Entries score prompt tokens start_pos+1 ...; recomputation after preemption overwrites equal values."""
        if self.prompt_logprobs is None:
            return
        for offset, entry in enumerate(entries):
            self.prompt_logprobs[start_pos + 1 + offset] = self._to_dict(entry)

    def append_tokens(self, request: Request, new_token_ids: list[int], logprobs: list[TokenLogprobs]) -> bool:
        """Record a step's tokens for one sample; True when a stop string ended it (the caller finishes it)."""
        sample = self.samples[request.request_id]
        if new_token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        keep_pieces = self.kind == "delta"
        stopped_by_text = False
        for i, token_id in enumerate(new_token_ids):
            sample.token_ids.append(token_id)
            if sample.logprobs is not None and i < len(logprobs):
                sample.logprobs.append(self._to_dict(logprobs[i]))
                sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + logprobs[i][1]
            if sample.detokenizer is not None:
                piece = sample.detokenizer.update([token_id])
                if piece and keep_pieces:
                    sample.text_pieces.append(piece)
                if sample.detokenizer.stop_reason is not None:
                    sample.finish_reason = "stop"
                    sample.stop_reason = sample.detokenizer.stop_reason
                    stopped_by_text = True
                    break
        if not stopped_by_text and request.is_finished:
            sample.finish_reason = request.status.value
            sample.stop_reason = request.stop_reason
            if sample.detokenizer is not None:
                piece = sample.detokenizer.flush()
                if piece and keep_pieces:
                    sample.text_pieces.append(piece)
        return stopped_by_text

    def _to_dict(self, entry: TokenLogprobs) -> LogprobsDict:
        token_id, logprob, rank, top = entry
        result: LogprobsDict = {}
        for top_rank, (top_id, top_logprob) in enumerate(top, start=1):
            result[top_id] = Logprob(top_logprob, top_rank, self._decode_one(top_id))
        if token_id not in result:
            result[token_id] = Logprob(logprob, rank, self._decode_one(token_id))
        return result

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def make_output(self) -> RequestOutput | None:
        """This step's output as the request's output_kind asks, or None when it asks for nothing now."""
        if self.kind == "delta":
            return self._delta_output()
        if self.kind == "final_only" and not self.finished:
            return None
        return self._full_output()

    def _delta_output(self) -> RequestOutput | None:
        outputs = [self._take_delta(s) for s in self.samples.values() if s.has_news]
        if not outputs:
            return None  # e.g. a prompt chunk that sampled nothing: the caller learns nothing new
        first, self._first_sent = not self._first_sent, True
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt if first else None,
            prompt_token_ids=self.prompt_token_ids if first else [],
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self._num_cached_tokens(),
            # Complete by now: a sample's first token is sampled only after the whole prompt was computed.
            prompt_logprobs=list(self.prompt_logprobs) if first and self.prompt_logprobs is not None else None,
            metrics=self._metrics(),
        )

    @staticmethod
    def _take_delta(s: _Sample) -> CompletionOutput:
        """Hand the pending lists over (no copy) and start empty ones."""
        token_ids, s.token_ids = s.token_ids, []
        logprobs = None
        if s.logprobs is not None:
            logprobs, s.logprobs = s.logprobs, []
        text = "".join(s.text_pieces)
        s.text_pieces.clear()
        s.finish_sent = s.finish_reason is not None
        return CompletionOutput(
            index=s.index,
            text=text,
            token_ids=token_ids,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=s.cumulative_logprob,
            spec_decoding=_spec_decoding(s),
        )

    def _full_output(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob,
                spec_decoding=_spec_decoding(s),
            )
            for s in self.samples.values()
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self._num_cached_tokens(),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            metrics=self._metrics(),
        )

    def _num_cached_tokens(self) -> int:
        first = next(iter(self.samples.values())).request
        return max(first.num_cached_tokens, 0)

    def _metrics(self) -> dict[str, float]:
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        return metrics


def _spec_decoding(s: _Sample) -> dict[str, Any] | None:
    return s.request.spec_stats.as_dict() if s.request.spec_stats.num_verify_steps else None
