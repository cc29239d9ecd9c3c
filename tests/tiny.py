"""Tiny real models for the mechanics tests: a BPE tokenizer trained on the spot and a
randomly initialised Qwen2 causal LM built from a config. Both take milliseconds."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from costeer_sdk import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "I ran ten miles in my new shoes and they felt light and springy.",
    "The cushioning is soft, the grip is good on wet trails, and the laces stay tied.",
    "My earlier pair wore out after five hundred miles; these look sturdier.",
    "Write a short review of the product. Be honest about what you liked.",
    "Record history profile context query answer turn now it's your",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]-",
]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML specials; a different size gives a
    different vocabulary (used for the mismatch test)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    hidden: int = 32,
    layers: int = 2,
    window: int = 512,
    name: str = "tiny",
) -> LoadedModel:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        initializer_range=0.3,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


def twin(model: LoadedModel) -> LoadedModel:
    """The same weights behind a worker of its own, so closing it spares the fixture."""
    return LoadedModel(model.name, model.model, model.tokenizer)


def make_sentencepiece_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (``▁`` for spaces, ``<0xNN>`` byte fallback, as
    Gemma's and Llama 2's): a family unlike `make_tokenizer`'s byte-level BPE."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    specials = ["<pad>", "<eos>", "<end_of_turn>", "<start_of_turn>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]
    ]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    sp.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=sp, eos_token="<end_of_turn>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
        "{% endif %}"
    )
    return tokenizer
