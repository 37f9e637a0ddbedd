"""Sampling below both the worker and speculative decoding: the sampler, the one logits-shaping function,
the rejection sampler, token bitmasks and the thinking budget."""
