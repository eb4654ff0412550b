"""Tiny random teachers (aliases ``tiny-random-llama``, ``-mistral``, ``-qwen2``) for smoke tests.

Real transformers classes with random weights and a real byte-level tokenizer: every code
path of t2r runs on them in seconds on a CPU, nothing to download.
"""
from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2")


def byte_level_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 byte tokens plus end-of-text and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], bos_token=specials[0],
                                   pad_token=specials[1])


def tiny_teacher_config(family: str = "llama", num_layers: int = 4, **overrides):
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny family {family!r} is not one of {', '.join(TINY_FAMILIES)}")
    kwargs = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, rms_norm_eps=1e-6)
    if family == "llama":
        kwargs.update(tie_word_embeddings=True)
    elif family == "mistral":
        kwargs.update(sliding_window=8, tie_word_embeddings=False)
    else:
        kwargs.update(tie_word_embeddings=False, use_sliding_window=False)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_teacher(family: str = "llama", seed: int = 0, **overrides):
    """(model, tokenizer): a random tiny ``family`` checkpoint in fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_teacher_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, p in model.named_parameters():  # give biases and norms values a checkpoint would have
        if name.endswith("bias") or "norm" in name:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), byte_level_tokenizer()
