"""Tiny in-process policies: ``tiny:<arch>`` models and a character-level tokenizer built without downloads.

Used by the tests and by the quickstart recipe, so that thinktree runs end to end with no model hub. The tokenizer
is a real ``PreTrainedTokenizerFast`` (character-level ``WordLevel`` over printable ASCII + newline, with BOS/EOS/PAD
and a ChatML-like chat template): it saves and reloads with ``save_pretrained`` like any HF tokenizer, so a trained
tiny policy is a standard HF checkpoint directory.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_ARCHS = ("llama", "qwen2", "mamba")
DEFAULT_SIZES: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus newline; EOS ``</s>`` doubles as nothing else."""
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, **sizes: Any):
    """The transformers config of a tiny ``arch`` model; ``sizes`` override hidden_size / num_hidden_layers."""
    s = {**DEFAULT_SIZES, **sizes}
    h, layers = int(s["hidden_size"]), int(s["num_hidden_layers"])
    common = dict(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=int(s.get("max_position_embeddings", 1024)), **common,
        )  # fmt: skip
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(
            hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=int(s.get("max_position_embeddings", 1024)), **common,
        )  # fmt: skip
    if arch == "mamba":
        from transformers import MambaConfig

        # use_mambapy: without the mamba_ssm CUDA kernels, transformers' reference scan loops over time and its
        # backward is ~100x a same-size Llama step on CPU; mambapy's parallel scan (a dependency) cuts that ~5x.
        return MambaConfig(
            hidden_size=h, num_hidden_layers=layers, state_size=16, expand=2, use_mambapy=True, **common
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def build_tiny_model(
    arch: str, seed: int = 0, **sizes: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny causal LM of ``arch`` (seeded, no global RNG touched) and its tokenizer."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
