"""Small transformers models built locally (no network) for demos, tests and benchmarks.

:func:`build_family` writes a base model and ``n`` "fine-tuned" variants (the base
plus seeded sparse-ish perturbations) with a tiny word-level tokenizer, each a
complete ``save_pretrained`` directory that mergekit and transformers load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

#: A little corpus for the word-level tokenizer; every word becomes a token.
_CORPUS = (
    "the quick brown fox jumps over the lazy dog . a merge of models keeps what "
    "each fine tune learned , one circuit at a time . priority decides who wins "
    "when signs disagree and agreeing deltas are averaged by temperature . "
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! hello world"
)

ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ToyFamily:
    """Paths of a generated base and its variants."""

    base: Path
    variants: List[Path]


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` built from the in-module corpus."""
    return word_level_tokenizer([*SPECIAL_TOKENS, *sorted(set(_CORPUS.split()))])


def word_level_tokenizer(tokens: Sequence[str]):
    """A whitespace-split word-level fast tokenizer whose ids are ``tokens``' positions.

    ``tokens`` must include :data:`SPECIAL_TOKENS` (unk, bos, eos, pad).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"word_level_tokenizer: tokens lack {missing}")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def model_config(
    architecture: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: Optional[int] = None,
    heads: int = 4,
    kv_heads: int = 2,
):
    """A transformers config of the given family and size."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    if architecture not in classes:
        raise ValueError(
            f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    return classes[architecture](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _save(model, tokenizer, path: Path, dtype) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # transformers 5 records its own class name (TokenizersBackend), which
    # transformers 4 (mergekit 0.1.4's environment) cannot load; the fast
    # tokenizer class name both understand keeps the family usable by both.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_family(
    root: os.PathLike,
    *,
    variants: int = 3,
    architecture: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: Optional[int] = None,
    seed: int = 0,
    scale: float = 0.01,
    dtype=None,
) -> ToyFamily:
    """Write ``root/base`` and ``root/variant{1..n}``; reuse them if present.

    Each variant is the base plus ``scale``-sized Gaussian noise on a seeded
    random half of every weight (so deltas overlap partly and disagree in sign
    sometimes, like real fine-tunes).
    """
    import torch
    import transformers

    root = Path(root)
    tokenizer = build_tokenizer()
    config = model_config(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        layers=layers,
        intermediate_size=intermediate_size,
    )
    family = ToyFamily(
        base=root / "base",
        variants=[root / f"variant{index + 1}" for index in range(variants)],
    )
    marker = root / ".complete"
    if marker.exists() and all(
        (p / "config.json").exists() for p in (family.base, *family.variants)
    ):
        return family

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save(model, tokenizer, family.base, dtype)
    for index, path in enumerate(family.variants):
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                original = base_state[name]
                if not original.is_floating_point():
                    continue
                noise = torch.randn(original.shape, generator=generator) * scale
                mask = torch.rand(original.shape, generator=generator) < 0.5
                tensor.copy_(original + noise * mask)
        _save(model, tokenizer, path, dtype)
    marker.write_text("ok\n")
    return family
