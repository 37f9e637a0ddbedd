"""Never slower, by measurement: how many tokens per second whole decode steps deliver, per way of drafting.

The cost model predicts from a start-up profile of bare forward passes. This measures the outcome, with
scheduling, sampling, verification, proposing and output processing included, for each way a step can
be drafted ("arm"):

- PLAIN: no drafts;
- LOOKUP: drafts from prompt lookup only (free to make);
- MODEL: drafts that include the draft model's (its steps paid for).

Measurements are kept per batch size (power-of-two buckets). Once every arm open to a step has been
measured at its batch size, the fastest one is used. Each losing arm is tried again after
`explore_every` steps of that batch size, then after twice as many each time (up to
`max_explore_every`), so the comparison stays current while exploring costs little: switching a draft
model back on is not free, as it first catches up on the text it missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAIN, LOOKUP, MODEL = "plain", "lookup", "model"


@dataclass
class _Rate:
    """Decayed sums of tokens emitted and seconds taken by one arm's steps."""

    tokens: float = 0.0
    seconds: float = 0.0
    count: int = 0
    last_step: int = -1

    def add(self, tokens: int, seconds: float, step: int, decay: float) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.count += 1
        self.last_step = step

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Bucket:
    arms: dict[str, _Rate] = field(default_factory=dict)
    retry_after: dict[str, int] = field(default_factory=dict)
    best: str | None = None
    steps: int = 0


class MeasuredRates:
    def __init__(
        self, explore_every: int = 128, max_explore_every: int = 4096, min_samples: int = 2, decay: float = 0.8
    ) -> None:
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.min_samples = min_samples
        self.decay = decay
        self._buckets: dict[int, _Bucket] = {}

    def observe(self, num_decodes: int, arm: str, tokens: int, seconds: float) -> None:
        """One step of num_decodes decodes alone, drafted by `arm`, that emitted `tokens` in `seconds`."""
        if num_decodes <= 0 or seconds <= 0.0:
            return
        bucket = self._bucket(num_decodes)
        bucket.arms.setdefault(arm, _Rate()).add(tokens, seconds, bucket.steps, self.decay)

    def decide(self, num_decodes: int, available: list[str], preferred: str, explore: bool = True) -> str:
        """The arm for the next step of num_decodes decodes; `preferred` is the cost model's choice.

        explore=False for a step that will not be measured (a prefill chunk beside the decodes): the best
        measured arm, or the preferred one while none is measured, and no retries."""
        bucket = self._bucket(num_decodes)
        bucket.steps += 1
        rates = {arm: bucket.arms.get(arm, _Rate()) for arm in available}
        unmeasured = [arm for arm in available if rates[arm].count < self.min_samples]
        if not explore:
            measured = [arm for arm in available if arm not in unmeasured]
            return max(measured, key=lambda arm: rates[arm].per_second) if measured else preferred
        if unmeasured:  # measure the cost model's choice first, then the others
            return preferred if preferred in unmeasured else unmeasured[0]
        best = max(available, key=lambda arm: rates[arm].per_second)
        if best != bucket.best:
            bucket.best, bucket.retry_after = best, {}
        for arm in available:
            if arm == best:
                continue
            retry_after = bucket.retry_after.get(arm, self.explore_every)
            if bucket.steps - rates[arm].last_step > retry_after:
                bucket.retry_after[arm] = min(2 * retry_after, self.max_explore_every)
                return arm
        return best

    def plain_settled(self, num_decodes: int) -> bool:
        """No drafts measured best at this batch size, and no other way is due a retry at the next step:
        the caller may skip looking for drafts altogether (then it still calls `decide` with PLAIN)."""
        bucket = self._bucket(num_decodes)
        if bucket.best != PLAIN:
            return False
        return all(bucket.steps + 1 - rate.last_step <= bucket.retry_after.get(arm, self.explore_every)
                   for arm, rate in bucket.arms.items() if arm != PLAIN)

    def summary(self) -> dict[int, dict[str, float]]:
        """Measured tokens per second by batch-size bucket and arm (for reports)."""
        return {key: {arm: round(rate.per_second, 1) for arm, rate in bucket.arms.items()}
                for key, bucket in sorted(self._buckets.items())}

    def _bucket(self, num_decodes: int) -> _Bucket:
        key = 1 << max(num_decodes - 1, 0).bit_length()  # 1, 2, 4, 8, ...: nearby batch sizes behave alike
        return self._buckets.setdefault(key, _Bucket())
