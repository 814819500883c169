"""Training the generalist base and the per-task experts; exact-match evaluation.

Everything is cached under the cache directory, keyed by the size settings and
the training seed, so a second run reuses the models. Each model directory is a
complete ``save_pretrained`` output (config, safetensors weights, tokenizer).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

from benchmarks.quality import tasks as T


@dataclass(frozen=True)
class TrainSettings:
    """Model size and training schedule (all of it is part of the cache key)."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    batch_size: int = 64
    base_steps: int = 300
    base_lr: float = 2e-3
    expert_steps: int = 100
    expert_lr: float = 1e-4
    weight_decay: float = 0.0
    #: share of long (6..7-symbol) inputs in the base's training mixture
    base_long_prob: float = 0.08
    #: share of each expert batch replaying the base's mixture
    expert_replay: float = 0.5

    def key(self, seed: int) -> str:
        """Cache key of a family (every setting and the seed)."""
        return _hash({**asdict(self), "seed": seed})

    def base_key(self, seed: int) -> str:
        """Cache key of the base alone: families that differ only in how the
        experts are fine-tuned share one base (so they are paired)."""
        fields = {k: v for k, v in asdict(self).items() if k not in EXPERT_FIELDS}
        return _hash({**fields, "seed": seed})


#: Settings that only shape the experts' fine-tuning, not the base.
EXPERT_FIELDS = ("expert_steps", "expert_lr", "expert_replay")


def _hash(blob: dict) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def model_config(settings: TrainSettings):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=len(T.VOCAB),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=T.TOKEN_ID["<s>"],
        eos_token_id=T.TOKEN_ID["</s>"],
        pad_token_id=T.PAD_ID,
    )


def new_model(settings: TrainSettings, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(model_config(settings))
    return model


def _loss(model, examples):
    import torch

    ids, labels, _ = T.encode_batch(examples)
    logits = model(input_ids=ids, attention_mask=(ids != T.PAD_ID).long()).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def base_sampler(settings: TrainSettings):
    """The base's training distribution: the task mixture, long inputs rare."""

    def draw(rng: random.Random) -> T.Example:
        return T.sample(rng.choice(T.TASKS), "train", rng, settings.base_long_prob)

    return draw


def expert_sampler(task: str, settings: TrainSettings):
    """An expert's: its task at all lengths, plus a replay of the base's mixture."""
    replay = base_sampler(settings)

    def draw(rng: random.Random) -> T.Example:
        if rng.random() < settings.expert_replay:
            return replay(rng)
        return T.sample(task, "train", rng)

    return draw


def train(
    model,
    draw,
    steps: int,
    lr: float,
    settings: TrainSettings,
    seed: int,
    log=None,
) -> None:
    """AdamW with linear warm-up (10%) and cosine decay on ``draw(rng)`` examples
    (train-split inputs only)."""
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup)
        * 0.5
        * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))),
    )
    model.train()
    for step in range(steps):
        batch = [draw(rng) for _ in range(settings.batch_size)]
        loss = _loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()


class Evaluator:
    """Exact-match accuracy per task on fixed held-out examples.

    Teacher-forced: an example counts as correct when the argmax at every answer
    position (answer digits and the closing ``</s>``) is the target token, which
    is exactly when greedy decoding from the prompt reproduces the answer and
    stops. One batched forward pass per task.
    """

    def __init__(self, examples: Dict[str, List[T.Example]]):
        self.batches = {task: T.encode_batch(ex) for task, ex in examples.items()}

    def __call__(self, model) -> Dict[str, float]:
        import torch

        scores = {}
        with torch.inference_mode():
            for task, (ids, labels, mask) in self.batches.items():
                logits = model(
                    input_ids=ids, attention_mask=(ids != T.PAD_ID).long()
                ).logits
                hit = (logits.argmax(-1) == labels) | ~mask
                scores[task] = hit.all(dim=1).float().mean().item()
        return scores


def load_weights(model, directory: Path):
    """Load a saved (or mergekit-written) model's safetensors into ``model``."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(
            f"{directory}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval()
    return model


@dataclass(frozen=True)
class Family:
    """A trained base and one expert per task (paths, in :data:`T.TASKS` order).

    ``kind`` names the expert schedule (e.g. ``replay`` or ``forget``), ``seed``
    is the training seed; ``id`` (``kind-seed``) identifies the family in the
    results.
    """

    seed: int
    root: Path
    base: Path
    experts: Dict[str, Path]
    kind: str = "replay"

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.seed}"


def _save(model, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    T.build_tokenizer().save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_family(
    cache: Path, settings: TrainSettings, seed: int, log=print, kind: str = "replay"
) -> Family:
    """Train (or reuse from ``cache``) the base and the four experts.

    The base is stored apart from the experts, keyed by the base's settings
    only, so two families with different expert schedules share it.
    """
    root = Path(cache) / "models" / f"family-{settings.key(seed)}"
    family = Family(
        seed=seed,
        root=root,
        base=Path(cache) / "models" / f"base-{settings.base_key(seed)}",
        experts={task: root / f"expert-{task}" for task in T.TASKS},
        kind=kind,
    )
    if (root / "complete.json").exists():
        return family
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not (family.base / "config.json").exists():
        family.base.parent.mkdir(parents=True, exist_ok=True)
        log(f"  training base (seed {seed}, {settings.base_steps} steps) ...")
        model = new_model(settings, seed)
        train(
            model, base_sampler(settings), settings.base_steps, settings.base_lr,
            settings, seed, log,
        )
        _save(model, family.base)
    for index, task in enumerate(T.TASKS):
        path = family.experts[task]
        if (path / "config.json").exists():
            continue
        log(f"  fine-tuning {kind} expert {task} ({settings.expert_steps} steps) ...")
        model = load_weights(new_model(settings, seed), family.base)
        train(
            model,
            expert_sampler(task, settings),
            settings.expert_steps,
            settings.expert_lr,
            settings,
            seed * 1000 + index + 1,
            log,
        )
        _save(model, path)
    (root / "complete.json").write_text(
        json.dumps({"settings": asdict(settings), "seed": seed,
                    "train_seconds": round(time.time() - started, 1)}, indent=1)
    )
    return family
