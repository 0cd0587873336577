"""vas-fit: train a value model from the command line (one process, or several under torchrun / accelerate).

    vas-fit --base HuggingFaceTB/SmolLM2-135M-Instruct --prompts prompts.txt \\
            --reward my_rewards:sentiment --output runs/sentiment --num-layers 4

Prompts: a text file with one prompt per line, or a .jsonl file with one object per line (`--prompt-field`).
The reward is `module:function`, importable from the current directory, with the signature
`function(prompts: list[str], completions: list[str]) -> list[float]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from .fit import fit
from .value_model import ValueModel


def load_prompts(path: str, field: str = "prompt") -> list[str]:
    """Prompts from a text file (one per line) or a JSON-lines file (`field` of each object)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if field not in record:
            raise ValueError(f"{path}, line {number}: no field {field!r} (use --prompt-field)")
        prompts.append(record[field])
    return prompts


def load_reward(spec: str):
    """`module:function` → the function, importing from the current directory too."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--reward must look like module:function, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: {module_name} has no function {function_name!r}")
    return function


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base causal LM: local path or Hub id")
    parser.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl")
    parser.add_argument("--prompt-field", default="prompt", help="field of a .jsonl prompt file")
    parser.add_argument("--reward", required=True, help="module:function returning one float per completion")
    parser.add_argument("--output", required=True, help="output directory (samples, checkpoints, value_model/)")
    parser.add_argument("--value-init", help="start from this value model (path or Hub id)")
    parser.add_argument("--num-layers", type=int, help="cut a fresh value model from the base's first N layers")
    parser.add_argument("--gguf-file", help="load the base from this GGUF file inside --base")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="completions per optimisation step")
    parser.add_argument("--sampling-batch-size", type=int, default=None,
                        help="completions per generate() call while sampling (default: --batch-size)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda (the local rank's) when available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    load = dict(gguf_file=args.gguf_file) if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.base, **load)
    base = AutoModelForCausalLM.from_pretrained(args.base, **load).to(device).eval()
    if args.value_init:
        value_model = ValueModel.from_pretrained(args.value_init, device=device)
    elif args.num_layers:
        value_model = ValueModel.from_backbone(base, num_layers=args.num_layers)
    else:
        value_model = None
    fit(
        base, tokenizer, load_prompts(args.prompts, args.prompt_field), load_reward(args.reward), value_model,
        samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, gamma=args.gamma, lam=args.lam, epochs=args.epochs,
        batch_size=args.batch_size, sampling_batch_size=args.sampling_batch_size, learning_rate=args.learning_rate,
        output_dir=args.output, seed=args.seed,
        progress=not args.no_progress, reward_name=args.reward,
    )
    logging.getLogger("vas_logits").info("Value model written to %s", Path(args.output) / "value_model")


if __name__ == "__main__":
    main()
