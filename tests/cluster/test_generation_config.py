"""A malformed generation_config.json is a warning naming the file, not a silent fallback."""
from __future__ import annotations

import json
import logging
import os

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM


def test_malformed_generation_config_warns_and_falls_back(tmp_path, caplog):
    path = make_tiny_llama(tmp_path / "m")
    gen = os.path.join(path, "generation_config.json")
    with open(gen, "w") as f:
        f.write('{"eos_token_id": [7,')   # truncated
    with caplog.at_level(logging.WARNING, logger="pagedray.cluster.core.engine_core"):
        llm = LLM(path, device="cpu", num_kv_blocks=16)
    warned = [r.getMessage() for r in caplog.records if gen in r.getMessage()]
    assert len(warned) == 1 and "cannot read" in warned[0]
    assert llm.llm_engine.eos_token_ids == [2]   # config.json's


def test_generation_config_eos_wins_over_config(tmp_path, caplog):
    path = make_tiny_llama(tmp_path / "m")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    with caplog.at_level(logging.WARNING):
        llm = LLM(path, device="cpu", num_kv_blocks=16)
    assert llm.llm_engine.eos_token_ids == [2, 7]
    assert not [r for r in caplog.records if "generation_config" in r.getMessage()]
