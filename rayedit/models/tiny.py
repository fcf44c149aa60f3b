"""Tiny random models of every supported family, built offline from a config (tests and demos).

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the text that ships with the package,
so any string tokenizes. Llama/Mistral-style tiny tokenizers add a BOS token (like their real
counterparts) so that BOS handling is exercised by tests.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .loading import LoadedModel, wrap_model

TINY_FAMILIES = ("gpt2", "gptj", "llama", "mistral", "qwen2", "qwen3")
BOS_FAMILIES = {"llama", "mistral"}
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]


def builtin_texts(limit: int | None = None) -> list[str]:
    """English sentences shipped with the package (GLUE/MMLU subsets): tokenizer training and offline stats."""
    import pyarrow.parquet as pq

    root = Path(__file__).resolve().parent.parent / "data" / "general"
    texts: list[str] = []
    for name, cols in [("sst2", ["sentence"]), ("cola", ["sentence"]), ("mrpc", ["sentence1", "sentence2"]),
                       ("rte", ["sentence1", "sentence2"]), ("nli", ["sentence1", "sentence2"]),
                       ("mmlu", ["question"])]:
        path = root / f"{name}.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path, columns=[c for c in cols])
        for c in cols:
            texts.extend(str(x).strip() for x in table.column(c).to_pylist() if x)
    if limit is not None:
        texts = texts[:limit]
    return texts


@lru_cache(maxsize=4)
def _tokenizer_json(with_bos: bool, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_texts(6000), trainer=trainer)
    if with_bos:
        bos = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(family: str = "gpt2", vocab_size: int = 1024):
    """A ``PreTrainedTokenizerFast`` for the tiny models (deterministic: same text, same merges)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_obj = Tokenizer.from_str(_tokenizer_json(family in BOS_FAMILIES, vocab_size))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", unk_token="<|unk|>")
    tok.padding_side = "right"
    return tok


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, d_model: int = 64, d_ff: int = 256,
                n_heads: int = 4, max_positions: int = 256):
    import transformers as tf

    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, n_inner=d_ff, **ids)
    if family == "gptj":
        return tf.GPTJConfig(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, n_inner=d_ff, rotary_dim=d_model // n_heads // 2, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2),
                  max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=d_model // n_heads, **common)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def build_tiny_model(family: str = "gpt2", seed: int = 0, n_layers: int = 4, d_model: int = 64,
                     d_ff: int = 256) -> LoadedModel:
    """A randomly initialised model of ``family`` with its tokenizer, fp32, on CPU, fully offline."""
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    tok = tiny_tokenizer(family)
    cfg = tiny_config(family, len(tok), n_layers=n_layers, d_model=d_model, d_ff=d_ff)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return wrap_model(model, tok, name=f"tiny-{family}-{n_layers}L-seed{seed}")


def save_tiny_model(family: str, out: str | Path, seed: int = 0, n_layers: int = 4) -> Path:
    """Write a tiny model + tokenizer with ``save_pretrained`` so it loads like any hub model."""
    out = Path(out)
    lm = build_tiny_model(family, seed=seed, n_layers=n_layers)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out
