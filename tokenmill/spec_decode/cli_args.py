"""Command-line flags for speculative decoding, shared by generate / chat / serve and bench."""

from __future__ import annotations

import argparse

from tokenmill.config import DTYPES, SPEC_METHODS, SpecConfig


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument("--speculative-method", choices=SPEC_METHODS, default=None,
                       help="draft tokens by prompt lookup (ngram), with a small draft model (draft), or by "
                            "lookup first and the draft model where the lookup finds nothing (ngram+draft)")
    group.add_argument("--num-speculative-tokens", type=int, default=4, help="the most drafts per request per step")
    group.add_argument("--draft-model", default=None, help="draft checkpoint sharing the target's tokenizer")
    group.add_argument("--draft-dtype", default=None, choices=DTYPES,
                       help="the draft model's dtype (default: the target's)")
    group.add_argument("--ngram-min", type=int, default=1, help="shortest suffix that prompt lookup matches")
    group.add_argument("--ngram-max", type=int, default=4, help="longest suffix that prompt lookup tries first")
    group.add_argument("--no-speculative-adaptive", action="store_true",
                       help="always draft the full length (no acceptance tracking or cost model)")
    group.add_argument("--draft-confidence-threshold", type=float, default=0.1,
                       help="stop drafting when the draft model's top probability falls below this")


def spec_config_from_args(args: argparse.Namespace) -> SpecConfig:
    return SpecConfig(
        method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_model=args.draft_model,
        adaptive=not args.no_speculative_adaptive,
        draft_confidence_threshold=args.draft_confidence_threshold,
        draft_dtype=args.draft_dtype,
        ngram_min=args.ngram_min,
        ngram_max=args.ngram_max,
    )


def spec_rows(stats: dict[str, object]) -> list[tuple[str, str]]:
    """Acceptance figures for a report, from LLMEngine.stats()."""
    if not stats.get("spec_num_verify_steps"):
        return []
    per_position = ", ".join(f"{v:.2f}" for v in stats.get("spec_per_position_acceptance", []))  # type: ignore[union-attr]
    return [
        ("spec acceptance rate", f"{stats['spec_acceptance_rate']:.3f}"),
        ("spec mean accepted length", f"{stats['spec_mean_accepted_length']:.2f}"),
        ("spec per-position acceptance", per_position),
        ("spec draft tokens", f"{stats['spec_num_draft_tokens']:,}"),
    ]
