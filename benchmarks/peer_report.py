"""Medians and ratios of the interleaved CPU comparison, as markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("tokenmill", "llama.cpp", "transformers")
PEERS = SYSTEMS[1:]


@dataclass
class Run:
    system: str
    dtype: str
    batch_size: int
    round: int
    tok_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    dtype: str
    batch_size: int
    rounds: int
    median_tok_per_s: dict[str, float]  # system -> median over rounds
    # tokenmill / peer: the median over rounds of each round's ratio. A round's systems ran back to back,
    # so pairing them cancels load that drifts between rounds.
    ratios: dict[str, float]
    tokenmill_pct_of_ceiling: float | None
    tokenmill_ceiling_tok_per_s: float | None


def summarize(runs: Iterable[Run]) -> list[Summary]:
    """One summary per (dtype, batch size), in the order the configurations first ran."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dtype, run.batch_size), []).append(run)
    summaries = []
    for (dtype, batch_size), group in groups.items():
        by_round: dict[int, dict[str, Run]] = {}
        for run in group:
            by_round.setdefault(run.round, {})[run.system] = run
        medians = {system: statistics.median(r.tok_per_s for r in group if r.system == system)
                   for system in SYSTEMS if any(r.system == system for r in group)}
        ratios = {}
        for peer in PEERS:
            paired = [systems["tokenmill"].tok_per_s / systems[peer].tok_per_s for systems in by_round.values()
                      if "tokenmill" in systems and peer in systems and systems[peer].tok_per_s > 0]
            if paired:
                ratios[peer] = statistics.median(paired)
        tokenmill = [r for r in group if r.system == "tokenmill"]
        summaries.append(Summary(
            dtype=dtype, batch_size=batch_size, rounds=len(by_round), median_tok_per_s=medians, ratios=ratios,
            tokenmill_pct_of_ceiling=_median_extra(tokenmill, "pct_of_ceiling"),
            tokenmill_ceiling_tok_per_s=_median_extra(tokenmill, "ceiling_tok_per_s"),
        ))
    return summaries


def _median_extra(runs: list[Run], key: str) -> float | None:
    values = [float(r.extra[key]) for r in runs if r.extra.get(key) is not None]
    return statistics.median(values) if values else None


def summary_table(summaries: list[Summary]) -> str:
    header = ["dtype", "batch", "rounds", *(f"{s} tok/s" for s in SYSTEMS), "tokenmill % of ceiling",
              *(f"tokenmill / {p}" for p in PEERS)]
    rows = []
    for s in summaries:
        rows.append([s.dtype, str(s.batch_size), str(s.rounds),
                     *(_num(s.median_tok_per_s.get(system)) for system in SYSTEMS),
                     _num(s.tokenmill_pct_of_ceiling, "{:.0f} %"),
                     *(_num(s.ratios.get(peer), "{:.2f}x") for peer in PEERS)])
    return _markdown(header, rows)


def raw_table(runs: Iterable[Run]) -> str:
    """Every round's figures, one row per (dtype, batch, round)."""
    cells: dict[tuple[str, int, int], dict[str, float]] = {}
    for run in runs:
        cells.setdefault((run.dtype, run.batch_size, run.round), {})[run.system] = run.tok_per_s
    rows = [[dtype, str(batch), str(round_ + 1), *(_num(figures.get(system)) for system in SYSTEMS)]
            for (dtype, batch, round_), figures in cells.items()]
    return _markdown(["dtype", "batch", "round", *(f"{s} tok/s" for s in SYSTEMS)], rows)


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)  # a dash: that system was not run


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
