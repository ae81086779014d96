"""Helpers the tests share: tiny checkpoints, HF references, fakes, server and cluster fixtures."""
