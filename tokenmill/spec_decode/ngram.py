"""N-gram (prompt lookup) proposer: no model, just the request's own tokens.

Find the most recent earlier occurrence of the last n tokens (longest n first) in the prompt and output,
and propose the tokens that followed it. Code, quotes and repeated structure make this surprisingly good.
When what followed runs into the end of the text, the text has been repeating with that period, and the
draft goes on repeating it: a run of one token, or a loop the model has fallen into, is drafted in full.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer


class NgramProposer(Proposer):
    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.lookup(r.token_ids, r.max_drafts)) for r in requests]

    def propose_free(self, requests: list[DraftRequest]) -> list[Draft | None]:
        return list(self.propose(requests))  # every lookup is free, even one that finds nothing

    def lookup(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to num_tokens tokens continuing token_ids (empty when nothing matches)."""
        if num_tokens <= 0:
            return []
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = list(token_ids[length - n :])
            # Scan backwards so the most recent match wins; it best predicts the local pattern.
            for start in range(length - n - 1, -1, -1):
                if token_ids[start] == suffix[0] and list(token_ids[start : start + n]) == suffix:
                    end = start + n
                    period = length - end  # the text since the match follows it: it repeats with this period
                    return [token_ids[end + i % period] for i in range(num_tokens)]
        return []
