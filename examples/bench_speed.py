"""Speed of generate() with VAS against plain generate(), and against recomputing V from scratch each step.

Random weights in real shapes (speed does not depend on the values):
    cpu: SmolLM2-135M-shaped Llama base; value model = its first 4 layers      (the 2-core CPU machine)
    gpu: Llama-2-7B-shaped base, TinyLlama-1.1B-shaped value model, bf16       (the paper's pairing)

    python examples/bench_speed.py --preset cpu
    python examples/bench_speed.py --preset gpu --batch-sizes 1 8 32
    python examples/bench_speed.py --preset gpu --compiled   # adds: base with a static cache, compiled
                                                              # (the transformers way) vs VAS(compile=True)

generate() compiles a static-cache base only on accelerators: on a CPU the --compiled "plain" row runs eager.

Prints one table per run; every ratio is taken within that run (same process, same prompts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

from vas_logits import VAS, ValueModel

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000)

PRESETS = {
    "cpu": dict(base=SMOLLM2_135M, value=dict(SMOLLM2_135M, num_hidden_layers=4), dtype=torch.float32,
                device="cpu", batch_sizes=[4], prompt_length=32, new_tokens=32, repeats=3),
    "gpu": dict(base=LLAMA2_7B, value=TINYLLAMA_1B, dtype=torch.bfloat16, device="cuda", batch_sizes=[1, 8, 32],
                prompt_length=64, new_tokens=128, repeats=3),
}


class RecomputeVAS(LogitsProcessor):
    """The naive contrast: V on every full prefix + candidate, batch × k sequences, no cache, every step."""

    def __init__(self, value_model: ValueModel, beta: float, top_k: int):
        self.value_model, self.beta, self.top_k = value_model, beta, top_k

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        candidate_scores, candidates = scores.topk(self.top_k, dim=-1)  # (B, k)
        batch_size, length = input_ids.shape
        prefixes = input_ids[:, None, :].expand(-1, self.top_k, -1)  # (B, k, T)
        sequences = torch.cat([prefixes, candidates[..., None]], dim=-1).reshape(-1, length + 1)
        values = self.value_model(sequences).values[:, -1].view(batch_size, self.top_k)
        values = values - values.mean(-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, candidates, candidate_scores + self.beta * values)


def build_models(preset: dict, head: str = "scalar"):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**preset["base"], attn_implementation="sdpa")).to(
        device=preset["device"], dtype=preset["dtype"]).eval()
    value_model = ValueModel.from_backbone(LlamaConfig(**preset["value"]), dtype=preset["dtype"],
                                           head=head).to(preset["device"])
    with torch.no_grad():
        value_model.head.weight.normal_(0, 0.02)
        if value_model.token_head:
            value_model.token_bias.normal_(0, 0.02)
    return base, value_model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_generate(base, prompts, processors, new_tokens, repeats, device, **generate_kwargs):
    """Median seconds of `repeats` generate() calls after one warm-up, and the peak CUDA memory (GiB)."""
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for attempt in range(repeats + 1):
        torch.manual_seed(attempt)
        synchronize(device)
        start = time.perf_counter()
        base.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=None,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                      logits_processor=processors() if processors else None, **generate_kwargs)
        synchronize(device)
        if attempt:  # the first call warms up kernels and allocators
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-recompute", action="store_true", help="leave out the naive recompute contrast")
    parser.add_argument("--head", choices=["scalar", "token"], default="scalar",
                        help="the value model's head: scalar (V(s∘a), 1 + k positions per step) or token (Q(s, ·), 1)")
    parser.add_argument("--compiled", action="store_true",
                        help="also time the base with cache_implementation='static' (compiled by generate()) "
                             "against the same with VAS(compile=True)")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    for key in ("batch_sizes", "new_tokens", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("The gpu preset needs CUDA")

    base, value_model = build_models(preset, args.head)
    if value_model.token_head:
        args.skip_recompute = True  # the naive recompute contrast forwards prefix∘a: a V(s∘a) model's
    base_parameters = sum(p.numel() for p in base.parameters())
    value_parameters = sum(p.numel() for p in value_model.parameters())
    # Matmul weights: the embedding lookup costs no FLOPs (the base's tied embedding is its LM head matmul).
    value_matmul = value_parameters - value_model.backbone.get_input_embeddings().weight.numel()
    cpu_name = f"CPU, {torch.get_num_threads()} threads"
    device_name = torch.cuda.get_device_name() if preset["device"] == "cuda" else cpu_name
    print(f"# bench_speed preset={args.preset} on {device_name}; torch {torch.__version__}; {preset['dtype']}")
    print(f"# base {base_parameters / 1e6:.0f}M parameters, value model {value_parameters / 1e6:.0f}M; "
          f"prompt {preset['prompt_length']} tokens, {preset['new_tokens']} new tokens, sampling, k={args.top_k}, "
          f"median of {preset['repeats']}")
    # Per generated token the base runs one position; VAS's value model runs 1 + k positions (token head: 1).
    positions = 1 if value_model.token_head else 1 + args.top_k
    flop_ratio = 1 + value_matmul * positions / base_parameters
    print(f"# value model head: {args.head}")
    print(f"# FLOP ratio of a VAS step to a plain step (weights only): {flop_ratio:.2f}x")
    print("| batch | plain tok/s | VAS tok/s | VAS / plain | recompute / plain | peak GiB plain / VAS |")
    print("|---|---|---|---|---|---|")
    compiled_rows = []
    for batch_size in preset["batch_sizes"]:
        prompts = torch.randint(3, preset["base"]["vocab_size"], (batch_size, preset["prompt_length"]),
                                device=preset["device"])
        timing = dict(repeats=preset["repeats"], new_tokens=preset["new_tokens"], device=preset["device"])
        plain, plain_peak = time_generate(base, prompts, None, **timing)
        vas, vas_peak = time_generate(base, prompts, lambda: [VAS(value_model, beta=1.0, top_k=args.top_k)], **timing)
        recompute = float("nan")
        if not args.skip_recompute:
            recompute, _ = time_generate(base, prompts, lambda: [RecomputeVAS(value_model, 1.0, args.top_k)], **timing)
        tokens = batch_size * preset["new_tokens"]
        print(f"| {batch_size} | {tokens / plain:.1f} | {tokens / vas:.1f} | {vas / plain:.2f}x | "
              f"{recompute / plain:.2f}x | {plain_peak:.2f} / {vas_peak:.2f} |", flush=True)
        if args.compiled:
            compiled_rows.append(time_compiled(base, value_model, prompts, args.top_k, timing))
    if args.compiled:
        print("\n| batch | compiled plain tok/s | VAS(compile=True) tok/s | VAS / plain | peak GiB plain / VAS |")
        print("|---|---|---|---|---|")
        for batch_size, plain, vas, plain_peak, vas_peak in compiled_rows:
            tokens = batch_size * preset["new_tokens"]
            print(f"| {batch_size} | {tokens / plain:.1f} | {tokens / vas:.1f} | {vas / plain:.2f}x | "
                  f"{plain_peak:.2f} / {vas_peak:.2f} |")


def time_compiled(base, value_model, prompts, top_k, timing):
    """The base with a static cache (generate() compiles its decoding forward) without and with VAS(compile=True);
    one processor serves every call, so its compiled step and buffers are built once (in the warm-up)."""
    static = dict(cache_implementation="static")
    plain, plain_peak = time_generate(base, prompts, None, **timing, **static)
    processor = VAS(value_model, beta=1.0, top_k=top_k, compile=True)
    vas, vas_peak = time_generate(base, prompts, lambda: [processor], **timing, **static)
    return prompts.shape[0], plain, vas, plain_peak, vas_peak


if __name__ == "__main__":
    main()
