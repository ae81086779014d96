"""An out-of-tree model class registered from user code runs through the engine (docs/adding_a_model.md)."""
from __future__ import annotations

from testkit.conformance_kit import build_checkpoint
from testkit.tiny_models import copy_as_arch

from pagedray.cluster import LLM, SamplingParams
from pagedray.models import ModelRegistry
from pagedray.models.gpt_neox import GPTNeoXForCausalLM


class MyNeoXForCausalLM(GPTNeoXForCausalLM):
    """Stands in for a user's own model file: same weights, a name the package does not know."""


def test_user_registered_arch_generates_like_the_in_tree_one(tmp_path, scoped_registry):
    src = build_checkpoint("GPTNeoXForCausalLM", "parallel_residual", str(tmp_path / "in_tree"))
    dst = copy_as_arch(src, tmp_path / "user", "MyNeoXForCausalLM")

    assert "MyNeoXForCausalLM" not in ModelRegistry.get_supported_archs()
    ModelRegistry.register_model("MyNeoXForCausalLM", MyNeoXForCausalLM)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)
    prompts = [{"prompt_token_ids": [5, 9, 14, 33, 3]}, {"prompt_token_ids": list(range(40, 61))}]
    ours = LLM(dst, device="cpu").generate(prompts, params, use_tqdm=False)
    ref = LLM(src, device="cpu").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in ref]
    assert [o.outputs[0].logprobs for o in ours] == [o.outputs[0].logprobs for o in ref]
