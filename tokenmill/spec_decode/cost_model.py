"""Choosing draft lengths: per request from its recent acceptance, per batch from measured step times.

Drafting pays when the tokens it is expected to add outweigh the longer verify step (and the draft
model's own steps). At small batches the target's step time barely grows with extra tokens, so drafts are
almost free; at large batches the step becomes compute-bound and every draft token costs real time. The
step times are measured at start-up (Speculator.profile), so the choice below switches drafting off
where the profile says it would make a step slower than plain decoding. Real steps then correct it: by
their duration (StepCalibration, below) and by the tokens per second they deliver (measured_rates.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Seconds per forward pass as a function of the number of tokens in it (piecewise linear)."""

    points: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, num_tokens: int) -> float:
        if not self.points:
            return 0.0
        xs = [x for x, _ in self.points]
        i = bisect.bisect_left(xs, num_tokens)
        if i < len(xs) and xs[i] == num_tokens:
            return self.points[i][1]
        if i == 0:
            return self.points[0][1]
        if i == len(xs):  # beyond the last point: extend the last segment's slope
            if len(xs) == 1:
                return self.points[0][1] * num_tokens / xs[0]
            (x0, y0), (x1, y1) = self.points[-2], self.points[-1]
        else:
            (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)


class AcceptanceTracker:
    """Per-token acceptance rate of one request's recent drafts (a decayed geometric estimate)."""

    def __init__(self, prior_accepted: float = 1.0, prior_rejected: float = 1.0, decay: float = 0.8) -> None:
        self.prior_accepted = prior_accepted
        self.prior_rejected = prior_rejected
        self.accepted = prior_accepted
        self.rejected = prior_rejected
        self.decay = decay

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        # A run of `a` acceptances ended by one rejection (none if all k were accepted) is the
        # likelihood of a truncated geometric; accepted / (accepted + rejected) is its estimate.
        self.accepted = self.accepted * self.decay + num_accepted
        self.rejected = self.rejected * self.decay + (1 if num_accepted < num_drafts else 0)

    def idle(self) -> None:
        """A step without drafts: the estimate relaxes toward the prior.

        Without this, a low estimate would keep the request from drafting, and so from ever being observed
        again: one early rejection could switch drafting off for the rest of a long generation."""
        self.accepted = self.accepted * self.decay + self.prior_accepted * (1.0 - self.decay)
        self.rejected = self.rejected * self.decay + self.prior_rejected * (1.0 - self.decay)

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


def expected_tokens(rate: float, num_drafts: int) -> float:
    """Tokens one verify step emits: accepted drafts plus the target's token."""
    if rate >= 1.0:
        return num_drafts + 1.0
    return (1.0 - rate ** (num_drafts + 1)) / (1.0 - rate)


def per_request_lengths(rates: list[float], max_drafts: list[int], min_gain: float) -> list[int]:
    """Drafts while the j-th one is still likely enough to be accepted (rate**j >= min_gain)."""
    lengths = []
    for rate, cap in zip(rates, max_drafts):
        k = 0
        while k < cap and rate ** (k + 1) >= min_gain:
            k += 1
        lengths.append(k)
    return lengths


def choose_batch_cap(
    rates: list[float],
    lengths: list[int],
    num_other_tokens: int,
    target: StepTimes,
    draft_step: StepTimes | None,
    spec_cost_factor: float = 1.0,
    uses_model: list[bool] | None = None,
) -> int:
    """The cap K on every request's drafts that maximizes expected tokens per second; 0 turns drafting off.

    num_other_tokens: tokens of the step besides the drafting requests' own (prefill chunks, other decodes).
    draft_step: seconds of one drafting step by number of drafting requests (None when drafting is free).
    spec_cost_factor: how much more a drafting step really costs than predicted, relative to a plain one
    (StepCalibration.spec_cost_factor); it scales the seconds of every K > 0.
    uses_model: per request, whether its drafts take draft-model steps (False: a free lookup); all by default.
    """
    if not rates or not target.points:
        return max(lengths, default=0)
    num_decodes = len(rates)
    best_cap, best_rate = 0, num_decodes / max(target(num_decodes + num_other_tokens), 1e-9)
    for cap in range(1, max(lengths, default=0) + 1):
        ks = [min(k, cap) for k in lengths]
        seconds = target(num_decodes + sum(ks) + num_other_tokens)
        model_ks = ks if uses_model is None else [k for k, model in zip(ks, uses_model) if model]
        if draft_step is not None and max(model_ks, default=0) > 0:
            seconds += max(model_ks) * draft_step(sum(1 for k in model_ks if k))
        seconds *= spec_cost_factor
        tokens = sum(expected_tokens(rate, k) for rate, k in zip(rates, ks))
        if tokens / max(seconds, 1e-9) > best_rate:
            best_cap, best_rate = cap, tokens / max(seconds, 1e-9)
    return best_cap


class StepCalibration:
    """Measured step time / predicted step time, kept apart for steps that verify drafts and steps that do not.

    The start-up profile times bare forward passes laid out as decodes. A real verify step also samples,
    checks drafts and proposes the next ones, and its attention differs (several queries per request), so
    on some machines it costs more than the profile says. Their ratio corrects the cost model. When drafting
    is off, the drafting ratio drifts back toward the plain one, so drafting gets retried now and then and
    recovers when the batch shrinks again.
    """

    def __init__(self, smoothing: float = 0.2, drift: float = 0.02) -> None:
        self.smoothing = smoothing
        self.drift = drift
        self.plain = 1.0
        self.spec = 1.0

    def observe(self, predicted_s: float, measured_s: float, drafted: bool) -> None:
        if predicted_s <= 0.0:
            return
        ratio = measured_s / predicted_s
        if drafted:
            self.spec += self.smoothing * (ratio - self.spec)
        else:
            self.plain += self.smoothing * (ratio - self.plain)
            self.spec += self.drift * (self.plain - self.spec)

    @property
    def spec_cost_factor(self) -> float:
        return self.spec / self.plain

