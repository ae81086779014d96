"""Helpers of the conformance kit (test_conformance.py), in a plain module so spawned ranks can import it.

`build_checkpoint` saves a random HF model of one table case; `run_rank` is
what each process of the single 2-rank gloo group runs: every case's logits at
TP=2 against the TP=1 logits computed by the parent, then (case ids prefixed
PP_PREFIX) the same ranks as two pipeline stages against HF's logits
(testkit/pp_checks.py). Results go to <out_dir>/rank<r>.json as
{case id: "ok" | traceback}.
"""
from __future__ import annotations

import datetime
import traceback

import torch
import torch.distributed as dist

from pagedray.models.conformance import tiny_config

ATOL = 1e-4
PP_PREFIX = "pp2:"   # a case run as 2 pipeline stages of 1 rank, on the same 2 ranks
# An untied output head PEAK times its random init: logits spread out, so top-2 near-ties (which
# fp32 summation order may break either way) are rarer while rounding stays well inside 1e-4:
# over the table's 13 cases x 12 prompts x 8 steps, steps with a top-2 gap under 1e-2 went from 18
# to 8 and the largest engine-vs-HF logprob difference from 1.7e-5 to 2.0e-5.
PEAK = 3.0


def case_id(arch: str, case: str) -> str:
    return f"{arch}-{case}"


@torch.no_grad()
def _randomise_vectors(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norm scales to 1 (or 0 for 1+w norms) and biases to 0; a weight loaded into the
    wrong slot would go unnoticed, so give every 1-D parameter distinct values."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() != 1:
            continue
        noise = 0.2 * torch.randn(p.shape, generator=gen)
        p.copy_(noise if name.endswith("bias") else 1.0 + noise)


def build_checkpoint(arch: str, case: str, path: str, seed: int = 0) -> str:
    """Save a float32 random-weight HF `arch` model of the table case into `path` (safetensors)."""
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(tiny_config(arch, case)).float().eval()
    _randomise_vectors(model, seed)
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            head.weight.mul_(PEAK)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _check_case(path: str, expected: torch.Tensor, world: int) -> None:
    from testkit.hf_compare import argmax_mismatch
    from testkit.tp_checks import model_logits
    got = model_logits(path, world)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    reason = argmax_mismatch(got, expected)
    if reason:
        raise AssertionError(f"greedy tokens differ from TP=1: {reason}")


def run_rank(rank: int, world: int, init_method: str, out_dir: str,
             cases: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Run every case at TP=`world`; one failure is recorded and the others still run."""
    torch.set_num_threads(1)
    # A rank stuck in a collective its peer never reaches fails after 2 minutes instead of hanging CI.
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from pagedray.models.layers.distributed import init_model_parallel
    from testkit import pp_checks
    results = {}
    try:
        for cid, (path, expected) in cases.items():
            try:
                if cid.startswith(PP_PREFIX):
                    init_model_parallel(1, world)   # the same world, now 2 stages of 1 rank
                    pp_checks.check_case(path, expected, 1)
                else:
                    _check_case(path, expected, world)
                results[cid] = "ok"
            except Exception:
                results[cid] = traceback.format_exc()
            dist.barrier()  # a rank that failed early must not leave its peer blocked in a collective
    finally:
        from testkit.tp_checks import finish_rank
        finish_rank(out_dir, rank, results)
