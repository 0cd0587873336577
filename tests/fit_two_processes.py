"""Run by test_fit.py under `torch.distributed.run --nproc_per_node 2`: fit() on the gloo backend."""

import os
import sys

import torch

from tests.helpers import count_good_words, tiny_causal_lm, word_tokenizer
from tests.test_fit import FIT_OPTIONS, random_prompts
from vas_logits import fit

output_dir = sys.argv[1]
torch.set_num_threads(1)
value_model = fit(tiny_causal_lm("llama"), word_tokenizer(), random_prompts(12), count_good_words, epochs=2,
                  output_dir=output_dir, **FIT_OPTIONS)
torch.save(value_model.state_dict(), os.path.join(output_dir, f"rank{os.environ['RANK']}.pt"))
