"""Token-level stop conditions: EOS, stop token ids, max_tokens, min_tokens, context length.

Stop strings need text, so the detokenizer checks those (engine/detokenizer.py).
"""

from __future__ import annotations

from tokenmill.core.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """The finished status the request reached with its last token, or None to go on."""
    params = request.sampling_params
    last_token = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last_token in params.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last_token in params.stop_token_ids:
            request.stop_reason = last_token
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
