"""Per-request output state: detokenized text, logprobs and finish reasons of the n samples."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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
        self.samples: dict[str, _Sample] = {}
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
        stopped_by_text = False
        for i, token_id in enumerate(new_token_ids):
            sample.token_ids.append(token_id)
            if sample.logprobs is not None and i < len(logprobs):
                sample.logprobs.append(self._to_dict(logprobs[i]))
                sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + logprobs[i][1]
            if sample.detokenizer is not None:
                sample.text += sample.detokenizer.update([token_id])
                if sample.detokenizer.stop_reason is not None:
                    sample.finish_reason = "stop"
                    sample.stop_reason = sample.detokenizer.stop_reason
                    stopped_by_text = True
                    break
        if not stopped_by_text and request.is_finished:
            sample.finish_reason = request.status.value
            sample.stop_reason = request.stop_reason
            if sample.detokenizer is not None:
                sample.text += sample.detokenizer.flush()
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

    def to_output(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob,
                spec_decoding=s.request.spec_stats.as_dict() if s.request.spec_stats.num_verify_steps else None,
            )
            for s in sorted(self.samples.values(), key=lambda s: s.index)
        ]
        first = next(iter(self.samples.values())).request
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )
