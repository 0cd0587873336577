"""vas-fit: train a value model from the command line (one process, or several under torchrun / accelerate).

    vas-fit --base HuggingFaceTB/SmolLM2-135M-Instruct --prompts prompts.txt \\
            --reward my_rewards:sentiment --output runs/sentiment --num-layers 4

Prompts: a text file with one prompt per line, or a .jsonl file with one object per line (`--prompt-field`).
The reward is `module:function`, importable from the current directory, with the signature
`function(prompts: list[str], completions: list[str]) -> list[float]`.

A base model behind an OpenAI-compatible API, or samples generated elsewhere (a .jsonl of prompt, completion,
reward), with a value model cut from a small local model that shares your tokenizer:

    vas-fit --endpoint http://127.0.0.1:8000/v1 --value-backbone HuggingFaceTB/SmolLM2-135M \
            --prompts prompts.txt --reward my_rewards:sentiment --output runs/api
    vas-fit --samples samples.jsonl --value-backbone HuggingFaceTB/SmolLM2-135M --output runs/given
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from .fit import DEFAULT_NUM_LAYERS, fit
from .fit_config import DEFAULT_PREFIX_REWARDS, FitConfig
from .prefix_rewards import PrefixRewards
from .rollouts import Rollouts
from .value_model import HEAD_TYPES, ValueModel


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default (when it has one) to its help."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


def _add_config_options(groups: dict[str, argparse._ArgumentGroup], required: tuple[str, ...]) -> None:
    """FitConfig's fields as options, so the dataclass and the command line never disagree: `--name` (a
    `--name/--no-name` pair for a yes/no field) with the field's help and default, plus its older flags."""
    for option in dataclasses.fields(FitConfig):
        group = groups.get(option.metadata["group"])
        if group is None:
            continue
        flag, older = f"--{option.name.replace('_', '-')}", option.metadata["flags"]
        kwargs = dict(dest=option.name, help=option.metadata["help"])
        if option.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = option.default
        if isinstance(option.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            for name in older:  # e.g. --last-epoch = --no-keep-best: the opposite of the default, unlisted
                group.add_argument(name, dest=option.name, action="store_const", const=not option.default,
                                   default=option.default, help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, *older, type=option.metadata["type"] or type(option.default), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-fit", description=__doc__, formatter_class=_HelpFormatter)
    what = parser.add_argument_group("what to train on")
    what.add_argument("--base", help="the frozen base causal LM: local path or Hub id")
    what.add_argument("--endpoint",
                      help="instead of --base: sample the base through this OpenAI-compatible API (its base URL)")
    what.add_argument("--endpoint-model", help="the served model's name (default: the first the server lists)")
    what.add_argument("--concurrency", type=int, default=8, help="requests in flight to --endpoint")
    what.add_argument("--samples", help="instead of sampling: a .jsonl of prompt, completion, reward "
                                        "[, finish_reason] per line, generated elsewhere")
    what.add_argument("--gguf-file", help="load --base (or --value-backbone) from this GGUF file inside it")
    what.add_argument("--prompts", help="prompt file: .txt (one prompt per line) or .jsonl (not with --samples)")
    what.add_argument("--prompt-field", default="prompt", help="the field holding the prompt in a .jsonl file")
    what.add_argument("--reward",
                      help="module:function(prompts, completions) -> list of floats, importable from here "
                           "(not with --samples)")
    model = parser.add_argument_group("the value model")
    model.add_argument("--value-init", help="start from this value model (path or Hub id) instead of a fresh one")
    model.add_argument("--value-backbone",
                       help="cut a fresh value model from this causal LM (path or Hub id), whose tokenizer is used "
                            "(default: --base; required with --endpoint or --samples)")
    model.add_argument("--num-layers", type=int, default=DEFAULT_NUM_LAYERS,
                       help="a fresh value model is the backbone's first N layers with a new head")
    model.add_argument("--head", choices=HEAD_TYPES, default="scalar",
                       help="scalar: the expected reward; distributional: a categorical reward distribution "
                            "(the processor then uses the soft value for each beta)")
    model.add_argument("--num-atoms", type=int, default=51, help="atoms of the distributional head")
    groups = {"sampling": parser.add_argument_group("sampling from the base"),
              "training": parser.add_argument_group("training"),
              "running": parser.add_argument_group("running")}
    _add_config_options(groups, required=("output_dir",))
    run = groups["running"]
    rollouts = parser.add_argument_group("rollouts beyond the base's own samples (--base only; vas_logits.Rollouts)")
    for option in dataclasses.fields(Rollouts):  # generated, so the dataclass and the command line never disagree
        rollouts.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default), default=option.default,
                              help=option.metadata["help"])
    prefixes = parser.add_argument_group("prefix rewards: partial completions scored too (vas_logits.PrefixRewards)")
    prefixes.add_argument("--no-prefix-rewards", action="store_true",
                          help="train on the returns alone (no reward calls on partial completions)")
    for option in dataclasses.fields(PrefixRewards):
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(option.default, bool) else \
            dict(type=type(option.default))
        prefixes.add_argument(f"--prefix-{option.name.replace('_', '-')}", default=option.default,
                              help=option.metadata["help"], **kind)
    run.add_argument("--device", default=None, help="default: cuda (the local rank's) when available, else cpu")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's choice; on a busy machine fewer can be faster)")
    return parser


def _check_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    sources = [name for name in ("base", "endpoint", "samples") if getattr(args, name)]
    if len(sources) != 1:
        parser.error(f"give exactly one of --base, --endpoint and --samples (got {sources or 'none'})")
    if args.samples and (args.prompts or args.reward):
        parser.error("--samples carry their prompts and rewards: drop --prompts and --reward")
    if not args.samples and not (args.prompts and args.reward):
        parser.error("--prompts and --reward are required (unless --samples)")
    if not args.base and not args.value_backbone:
        parser.error("--value-backbone is required with --endpoint or --samples (its tokenizer reads their text)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_sources(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .endpoint import CompletionsEndpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    load = dict(gguf_file=args.gguf_file) if args.gguf_file else {}
    backbone_source = args.value_backbone or args.base
    tokenizer = AutoTokenizer.from_pretrained(backbone_source, **load)
    base = AutoModelForCausalLM.from_pretrained(args.base, **load).to(device).eval() if args.base else None
    if args.value_init:
        value_model = ValueModel.from_pretrained(args.value_init, device=device)
    else:
        backbone = base if base is not None and not args.value_backbone else \
            AutoModelForCausalLM.from_pretrained(backbone_source, **load)
        num_layers = min(args.num_layers, backbone.config.get_text_config().num_hidden_layers)
        head = dict(head=args.head, num_atoms=args.num_atoms) if args.head != "scalar" else {}
        value_model = ValueModel.from_backbone(backbone, num_layers=num_layers, **head).to(device)
    if args.endpoint:
        base = CompletionsEndpoint(args.endpoint, args.endpoint_model, concurrency=args.concurrency)
    sources = dict(samples=args.samples) if args.samples else dict(
        prompts=load_prompts(args.prompts, args.prompt_field), reward_fn=load_reward(args.reward))
    config = FitConfig(
        **{option.name: getattr(args, option.name) for option in dataclasses.fields(FitConfig)
           if option.metadata["group"] is not None},
        reward_name=args.reward or None,
        rollouts=Rollouts(**{option.name: getattr(args, option.name) for option in dataclasses.fields(Rollouts)}),
        prefix_rewards=None if args.no_prefix_rewards else _prefix_rewards(args))
    fit(base, tokenizer, value_model=value_model, **sources, config=config)
    logging.getLogger("vas_logits").info("Value model written to %s", Path(args.output_dir) / "value_model")


def _prefix_rewards(args) -> PrefixRewards:
    """The command line's PrefixRewards: fit()'s default object when none of its options changed (so that it
    applies only where it can, as in fit()), else one with the values given."""
    given = PrefixRewards(**{option.name: getattr(args, f"prefix_{option.name}")
                             for option in dataclasses.fields(PrefixRewards)})
    return DEFAULT_PREFIX_REWARDS if given == DEFAULT_PREFIX_REWARDS else given


if __name__ == "__main__":
    main()
