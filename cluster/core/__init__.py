"""The engine core: token ids in, per-step batches of token deltas out.

Runs in-process (offline `LLM`, tests), in a local subprocess (`pagedray serve`) or in a Ray
actor (a replica on a cluster). It holds no tokenizer: text, stop strings and streams belong to
the serving front (`pagedray.cluster.serving`).
"""
