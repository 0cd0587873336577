"""Tiny random models and the naive VAS reference the tests compare against."""

from __future__ import annotations

import math

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LogitsProcessor,
    MistralConfig,
    Qwen2Config,
)

from vas_logits import ValueModel

VOCAB_SIZE = 96
PAD, BOS, EOS = 0, 1, 2


def tiny_config(architecture: str, num_layers: int = 2, seed_offset: int = 0):
    """A 2-layer config with a 96-token vocabulary; Mistral and Qwen2 use a short sliding window."""
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if architecture == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if architecture == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=5, **common)
    if architecture == "qwen2":  # mixed layers: the last one slides (max_window_layers=1)
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                           sliding_window=4, max_window_layers=1, **common)
    if architecture == "gpt2":
        return GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=256, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, max_position_embeddings=256, **common)
    raise ValueError(architecture)


ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def tiny_causal_lm(architecture: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(architecture), dtype=dtype).eval()


def tiny_value_model(architecture: str, seed: int = 1, dtype=torch.float32, **metadata) -> ValueModel:
    """A value model with a random (non-zero) head, so its values vary across candidates."""
    torch.manual_seed(seed)
    value_model = ValueModel.from_backbone(tiny_config(architecture), dtype=dtype, pad_token_id=PAD, **metadata)
    with torch.no_grad():
        value_model.head.weight.normal_(0, 1.0)
        value_model.head.bias.normal_(0, 1.0)
        if value_model.token_head:
            value_model.token_bias.normal_(0, 1.0)
    return value_model.eval()


class Spy(LogitsProcessor):
    """Records (input_ids, scores) at every call and passes scores through."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


@torch.no_grad()
def naive_vas(value_models, betas, input_ids, scores, top_k, pad_token_id=PAD, outside_top_k="mask",
              is_real=None):
    """The closed form, recomputed from scratch: V on each full (unpadded) prefix + candidate, no cache.

    Padding: `is_real` (batch, seq) bool when given, else leading `pad_token_id`s."""
    out = torch.full_like(scores, -math.inf) if outside_top_k == "mask" else scores.clone()
    top_k = min(top_k, scores.shape[-1])
    candidate_scores, candidates = scores.topk(top_k, dim=-1)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row]
        if is_real is not None:
            ids = ids[is_real[row]]
        elif pad_token_id is not None:
            real = (ids != pad_token_id).cumsum(0) > 0
            ids = ids[real]
        adjustment = torch.zeros(top_k)
        for value_model, beta in zip(value_models, betas):
            device = value_model.device
            if value_model.config.head == "token":  # Q(s, a) of every candidate from the prefix alone
                output = value_model(ids[None].to(device), next_tokens=candidates[row][None, None].to(device))
                adjustment += (beta * (output.values[0, -1].double().cpu() - output.values[0, -1].double().mean()
                                       .cpu())).float()
                continue
            sequences = torch.cat([ids.repeat(top_k, 1), candidates[row][:, None]], dim=-1).to(device)
            output = value_model(sequences)
            if value_model.config.head == "distributional":  # the soft value (1/beta) log E_p[exp(beta z)]
                probabilities = output.logits[:, -1].double().softmax(-1).cpu()  # (k, A)
                atoms = torch.linspace(*value_model.config.value_range, value_model.config.num_atoms).double()
                if beta == 0:
                    q = probabilities @ atoms
                else:
                    q = torch.log((probabilities * torch.exp(beta * atoms)).sum(-1)) / beta
            else:
                q = output.values[:, -1].double().cpu()  # (k,)
            adjustment += (beta * (q - q.mean())).float()
        out[row, candidates[row]] = (candidate_scores[row].float() + adjustment.to(scores.device)).to(scores.dtype)
    return out


def word_tokenizer():
    """A word-level fast tokenizer over the tiny models' 96 ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then w4 .. w95."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB_SIZE)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


GOOD_WORDS = {f"w{i}" for i in range(10, 22)}  # 12 of the 96 ids


def count_good_words(prompts, completions):
    """A synthetic reward: how many words of the completion are in GOOD_WORDS."""
    return [float(sum(word in GOOD_WORDS for word in completion.split())) for completion in completions]


def bpe_tokenizer():
    """A byte-level BPE fast tokenizer with at most 96 ids, trained here on a fixed text, so that text pieces
    merge across boundaries and split into several tokens as real tokenizers' do. <s> is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["the movie was great and the plot was fine", "a bad film with a good cast", "it was not bad at all",
              "w4 w10 w12 w23 w35 w46 w57 w68 w79 w91 w88"]  # the word tokenizer's words, as several tokens
    alphabet = sorted(set("".join(corpus)))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0] + alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE, tokenizer.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_vllm_llama(folder):
    """A tiny random Llama that vLLM's CPU engine can serve (head size 64, which its attention supports), saved
    with the word tokenizer to `folder`; returns the HF model with the same weights, for references."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return base
