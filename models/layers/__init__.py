"""Shared layers: tensor-parallel linear/embedding, paged attention, rotary, norms, activations."""
