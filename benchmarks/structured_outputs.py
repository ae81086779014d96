"""Structured outputs: throughput with a JSON schema on every request against the same batch
unconstrained, in one run (same engine, same prompts); and the compile time of a large schema.

    python benchmarks/structured_outputs.py --shape llama3-8b --num-requests 256 --output-len 256
    python benchmarks/structured_outputs.py --shape tiny --device cpu --num-requests 8 --output-len 16

Dummy weights in the named shape and a synthetic byte-level BPE tokenizer of the shape's full
vocabulary (random concatenations of ASCII letters, digits, spaces and punctuation: the mix a JSON
grammar sees in a real vocabulary; no tokenizer is downloaded). `ignore_eos` keeps every request
to exactly --output-len tokens; the schema (an open-ended array of records) never forces an end
that early, so every token of a constrained request is masked. Runs are alternated
(unconstrained, constrained, ...) --repeats times; medians are reported. The goal (issue 24):
constrained within 10 % of unconstrained at 256 concurrent requests. Every run writes a record
(benchmarks/records/; `python benchmarks/records.py` regenerates RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

from common import SHAPES, append_results, markdown_table, random_prompts, write_config

SCHEMA = {"type": "object", "properties": {
    "records": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "id": {"type": "integer"}, "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "active": {"type": "boolean"}}, "required": ["name", "id", "score", "tags", "active"]}}},
    "required": ["records"]}


def large_schema(num_properties: int) -> dict:
    """An object of `num_properties` typed fields, nested two levels (the compile-time case)."""
    kinds = [{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "number"},
             {"type": "array", "items": {"type": "string"}}, {"type": "boolean"},
             {"type": "string", "enum": ["x", "y", "z"]}]
    inner = {f"f{i}": kinds[i % len(kinds)] for i in range(num_properties)}
    return {"type": "object", "properties": {
        f"group{g}": {"type": "object", "properties": inner, "required": list(inner)[: num_properties // 2]}
        for g in range(4)}, "required": [f"group{g}" for g in range(4)]}


def write_tokenizer(path: str, vocab_size: int, eos_id: int, seed: int = 0) -> None:
    """A byte-level BPE tokenizer.json of exactly `vocab_size` ids whose merges build random
    ASCII pieces (and their space-prefixed forms); `eos_id` is the special token </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = []
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkqjxz" * 3 + "ETAOINSHRDL0123456789{}[]\":,.-_ Ġ"
    pieces = [c if c != " " else "Ġ" for c in letters if (c if c != " " else "Ġ") in vocab]
    target = vocab_size - 1   # one id left for eos
    short: list[str] = []   # made pieces that may still grow (real vocabularies: mostly 2-10 characters)
    while len(vocab) < target:
        a = rng.choice(pieces) if rng.random() < 0.2 or not short else rng.choice(short)
        new = a + rng.choice(pieces)
        if new in vocab:
            continue
        vocab[new] = len(vocab)
        merges.append((a, new[len(a):]))
        if len(new) < 10:
            short.append(new)
    specials = {"</s>": eos_id}
    ordered = {tok: (i if i < eos_id else i + 1) for tok, i in vocab.items()}
    ordered.update(specials)
    tok = Tokenizer(models.BPE(vocab=ordered, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)


def timed(llm, prompts, params) -> float:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    lengths = {len(o.outputs[0].token_ids) for o in outs}
    if lengths != {params.max_tokens}:
        raise RuntimeError(f"output lengths {sorted(lengths)}, expected {params.max_tokens}")
    return elapsed


def compile_times(path: str, vocab_size: int, sizes: list[int]) -> list[list[object]]:
    """Seconds to compile large_schema(n) for this vocabulary, cold (a fresh backend each)."""
    from pagedray.common.sampling_params import StructuredOutputsParams
    from pagedray.workers.structured_output import GrammarBackend
    rows = []
    for n in sizes:
        backend = GrammarBackend(path, vocab_size)
        backend.compiled(StructuredOutputsParams(json_object=True))   # tokenizer info built: not counted
        spec = StructuredOutputsParams(json=large_schema(n))
        start = time.perf_counter()
        backend.compiled(spec)
        rows.append([n, len(spec.source), f"{time.perf_counter() - start:.3f}"])
        backend.shutdown()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedray.cluster import LLM, SamplingParams
    from pagedray.common.sampling_params import StructuredOutputsParams
    path = tempfile.mkdtemp(prefix=f"so-{args.shape}-")
    write_config(args.shape, path)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    write_tokenizer(path, vocab, SHAPES[args.shape][1]["eos_token_id"])
    compile_rows = compile_times(path, vocab, args.compile_sizes)
    print("compile:", compile_rows, flush=True)
    llm = LLM(path, load_format="dummy", dtype=args.dtype, device=args.device, enable_prefix_caching=False,
              max_model_len=args.input_len + args.output_len + 8, max_num_seqs=args.num_requests,
              seed=0, gpu_memory_utilization=args.gpu_memory_utilization)
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=0)
    free = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=args.output_len)
    schema = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=args.output_len,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    timed(llm, prompts[: min(8, len(prompts))], free)     # warm-up (graphs, allocator)
    timed(llm, prompts[: min(8, len(prompts))], schema)   # warm-up (grammar compiled and cached)
    runs = {"unconstrained": [], "json schema": []}
    for _ in range(args.repeats):
        runs["unconstrained"].append(timed(llm, prompts, free))
        runs["json schema"].append(timed(llm, prompts, schema))
    tokens = args.num_requests * args.output_len
    base = statistics.median(runs["unconstrained"])
    rows = [[name, f"{statistics.median(t):.3f}", f"{tokens / statistics.median(t):,.0f}",
             f"{(statistics.median(t) / base - 1) * 100:+.1f} %"] for name, t in runs.items()]
    table = markdown_table(["batch", "median s", "output tok/s", "vs unconstrained"], rows)
    compile_table = markdown_table(["schema fields", "schema chars", "compile s (cold)"], compile_rows)
    print(table)
    print(compile_table)
    medians = {name: statistics.median(t) for name, t in runs.items()}
    figures = {"constrained vs unconstrained %": round((medians["json schema"] / base - 1) * 100, 1),
               "unconstrained tok/s": round(tokens / base), "json schema tok/s": round(tokens / medians["json schema"])}
    figures.update({f"compile s ({row[0]} fields)": float(row[2]) for row in compile_rows})
    append_results(f"{args.shape}, {args.num_requests} x {args.input_len}/{args.output_len}, json schema vs free",
                   f"{table}\n\nGrammar compile time, large JSON schema (vocab {vocab}):\n\n{compile_table}",
                   args.results, figures=figures, anchors={"target": "<= 10 % slower at 256 concurrent"})
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--compile-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[50, 200, 800])
    p.add_argument("--results", default=None, help="also append the tables to this markdown file")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
