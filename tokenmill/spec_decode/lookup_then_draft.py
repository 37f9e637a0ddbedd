"""Prompt lookup first, the draft model only where the lookup finds nothing ("ngram+draft").

Lookup drafts cost no model step, and on code and other repetitive text they are often long and right;
the draft model covers the new text that has no earlier occurrence. The speculator sees lookup drafts
through `propose_free` and charges draft-model steps only to the requests that go to the model, so the
cost model can keep lookups on where running the draft model would not pay.
"""

from __future__ import annotations

from tokenmill.spec_decode.draft_model import DraftModelProposer
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer


class LookupThenDraftProposer(Proposer):
    def __init__(self, lookup: NgramProposer, model: DraftModelProposer) -> None:
        self.lookup = lookup
        self.model = model
        self.num_lookahead_tokens = model.num_lookahead_tokens

    def propose_free(self, requests: list[DraftRequest]) -> list[Draft | None]:
        drafts = self.lookup.propose(requests)
        return [draft if draft.token_ids else None for draft in drafts]

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return self.model.propose(requests)

    def resumed(self, req_id: str) -> None:
        self.model.resumed(req_id)

    def finished(self, req_id: str) -> None:
        self.model.finished(req_id)

    def profile_draft_step(self, num_seqs: int) -> float | None:
        return self.model.profile_draft_step(num_seqs)

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.model.kv_bytes_per_block(block_size)

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.model.init_cache(num_blocks, block_size)
