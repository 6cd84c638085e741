"""Sampling: logits of the rows that sample this step -> token ids (and logprobs)."""
