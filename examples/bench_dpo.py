"""DPO (TRL's DPOTrainer) on VAS's own data budget, measured like bench_quality.py's methods.

The pairs come from the samples examples/sentiment.py drew from the frozen base to train its value model
(320 training openings × 4 completions, VADER-scored, in examples/.cache/sentiment-4layers/samples.jsonl):
for each opening the best completion is "chosen" and the worst "rejected" (ties skipped). So DPO sees exactly
the samples and rewards VAS was trained on. SmolLM2-135M-Instruct is fine-tuned in full (float32) for each
DPO beta, then samples 4 completions of each of the 64 held-out openings (24 tokens, T=1, seed 1); KL is
measured as for VAS: the mean over samples of sum_t [log pi_dpo(a_t|s_t) - log pi_ref(a_t|s_t)] over the
generated tokens. Writes dpo.json (rows in bench_quality's Result format, training cost in `extra`).

Needs TRL (its own environment is simplest: it pulls accelerate and datasets):

    pip install trl
    python examples/bench_dpo.py --betas 0.1 0.5      # ~10 min per beta on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_quality import Result, matmul_parameters
from common import (CACHE, EXAMPLES, add_threads_option, held_out_prompts, load_smollm2, mean_and_se, movie_prompts,
                    pad_token_id, use_threads, vader_reward)
from tqdm.auto import tqdm


def preference_pairs(samples_path: Path, tokenizer) -> list[dict]:
    """One {"prompt", "chosen", "rejected"} per training opening: its best and worst stored completion."""
    prompts = movie_prompts()
    by_prompt: dict[int, list[dict]] = {}
    for line in samples_path.read_text().splitlines():
        sample = json.loads(line)
        by_prompt.setdefault(sample["prompt_index"], []).append(sample)
    pairs = []
    for index, samples in sorted(by_prompt.items()):
        best, worst = max(samples, key=lambda s: s["reward"]), min(samples, key=lambda s: s["reward"])
        if best["reward"] == worst["reward"]:
            continue
        text = lambda s: tokenizer.decode(s["completion_ids"], skip_special_tokens=True)  # noqa: E731
        pairs.append({"prompt": prompts[index], "chosen": text(best), "rejected": text(worst)})
    return pairs


@torch.no_grad()
def sample_and_measure(policy, reference, tokenizer, prompts, per_prompt, args):
    """Completions of every prompt from `policy` and each one's summed log pi_policy - log pi_ref."""
    rows = [p for p in prompts for _ in range(per_prompt)]
    texts, log_ratios = [], []
    torch.manual_seed(args.seed)
    for start in tqdm(range(0, len(rows), args.batch_size), desc="sampling", unit="batch"):
        batch = tokenizer(rows[start : start + args.batch_size], return_tensors="pt", padding=True)
        out = policy.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                              return_dict_in_generate=True, output_logits=True)
        prompt_length = batch["input_ids"].shape[1]
        new = out.sequences[:, prompt_length:]
        is_eos = new == tokenizer.eos_token_id
        alive = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        policy_logp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
        mask = torch.cat([batch["attention_mask"], alive.long()], 1)
        ref_logits = reference(input_ids=out.sequences, attention_mask=mask).logits[:, prompt_length - 1 : -1]
        ref_logp = ref_logits.float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
        log_ratios.append(torch.where(alive, policy_logp - ref_logp, 0.0).sum(-1))
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts, torch.cat(log_ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=CACHE / "sentiment-4layers" / "samples.jsonl")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE / "bench_dpo")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    add_threads_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    reference, tokenizer = load_smollm2()
    pairs = preference_pairs(args.samples, tokenizer)
    prompts = held_out_prompts()[: args.prompts]
    results_path = args.output / "dpo.json"
    results = [Result(**row) for row in json.loads(results_path.read_text())] if results_path.exists() else []
    print(f"{len(pairs)} preference pairs from {args.samples}")
    for beta in args.betas:
        setting = f"β={beta:g}" + ("" if args.learning_rate == 5e-6 else f", lr {args.learning_rate:g}")
        if any(r.setting == setting for r in results):
            print(f"DPO {setting}: already in {results_path}")
            continue
        folder = args.cache / f"beta{beta:g}-lr{args.learning_rate:g}-e{args.epochs:g}"
        started = time.perf_counter()
        if not (folder / "model.safetensors").exists():
            policy = AutoModelForCausalLM.from_pretrained(CACHE / "smollm2-135m-instruct", dtype=torch.float32)
            config = DPOConfig(output_dir=str(folder / "run"), beta=beta, learning_rate=args.learning_rate,
                               num_train_epochs=args.epochs, per_device_train_batch_size=args.train_batch_size,
                               precompute_ref_log_probs=True, logging_steps=10, save_strategy="no",
                               report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available())
            trainer = DPOTrainer(policy, args=config, train_dataset=Dataset.from_list(pairs),
                                 processing_class=tokenizer)
            trainer.train()
            policy.save_pretrained(folder)
            (folder / "cost.json").write_text(json.dumps({"seconds": time.perf_counter() - started,
                                                           "steps": trainer.state.global_step}))
        policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        cost = json.loads((folder / "cost.json").read_text())
        texts, log_ratios = sample_and_measure(policy, reference, tokenizer, prompts, args.samples_per_prompt, args)
        rewards = torch.tensor(vader_reward([p for p in prompts for _ in range(args.samples_per_prompt)], texts))
        reward, se = mean_and_se(rewards.view(len(prompts), -1).mean(-1).tolist())
        kl = log_ratios.mean().item()
        results.append(Result("DPO", setting, reward, se, kl, 1.0, 1.0, 1.0, extra=dict(
            train_seconds=cost["seconds"], train_steps=cost["steps"], pairs=len(pairs),
            trainable_parameters=sum(p.numel() for p in policy.parameters()),
            matmul_parameters=matmul_parameters(policy), epochs=args.epochs, learning_rate=args.learning_rate,
            kl_se=(log_ratios.std() / len(log_ratios) ** 0.5).item())))
        print(f"DPO {setting}: reward {reward:+.3f} ± {se:.3f}, KL {kl:.2f} (trained {cost['seconds']:.0f} s, "
              f"{cost['steps']} steps)", flush=True)
        args.output.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"Wrote {results_path}")


if __name__ == "__main__":
    main()
