"""Typed recipe configuration: nested YAML sections mapped onto dataclasses, strict keys, CLI overrides.

A recipe looks like::

    model: {policy: "tiny:llama", dtype: float32}
    task: {name: arith, train_size: 512, eval_size: 64}
    search: {method: mcts, num_simulations: 16, num_children: 4}
    train: {algo: grpo, learning_rate: 1.0e-4}
    rounds: {num_rounds: 2, warm_start: {algo: sft, steps: 300}}
    output: {dir: runs/quickstart}
    seed: 0

Why not TRL's ``TrlParser``: it reads a *flat* YAML whose keys are spread over several dataclasses, and each
dataclass must own distinct field names. A thinktree recipe has sections that share names (``search.temperature`` vs
``eval.temperature``, ``train.learning_rate`` vs ``rounds.warm_start.learning_rate``), so a nested shape reads better
and avoids collisions. We keep TRL's conventions otherwise: dataclasses with one-line field docs are the schema,
unknown keys are an error (naming the key and the closest known one), and any field can be overridden on the command
line as ``section.field=value`` (``--search.num_simulations 32`` works too), with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thinktree.search.mcts import MCTSConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TaskConfig",
    "SearchConfig",
    "TrainConfig",
    "WarmStartConfig",
    "RoundsConfig",
    "EvalConfig",
    "OutputConfig",
    "AblateConfig",
    "RecipeConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
]


class ConfigError(ValueError):
    """A recipe that cannot be mapped onto the config dataclasses (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    policy: str = "tiny:llama"
    """Model spec: tiny:<arch>, a local HF dir, a .gguf file, package:<pkg>/<file>, or a hub id."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    lora: dict | None = None
    """peft LoRA settings (r, lora_alpha, lora_dropout, target_modules); null = full fine-tuning."""
    tiny_sizes: dict | None = None
    """Sizes for tiny:<arch> models, e.g. {hidden_size: 128, num_hidden_layers: 4}."""
    use_chat_template: bool = False
    """Format prompts with the tokenizer's chat template (instruct checkpoints); plain text otherwise."""


@dataclass
class TaskConfig:
    name: str = "arith"
    """Task name from thinktree.rewards.TASKS (arith, countdown, gsm8k, math500)."""
    train_size: int = 512
    """Number of training prompts drawn from the train split."""
    eval_size: int = 64
    """Number of held-out prompts drawn from the test split."""
    kwargs: dict = field(default_factory=dict)
    """Task knobs passed to the task constructor (e.g. arith ops/digits, gsm8k path)."""


@dataclass(frozen=True)
class SearchConfig(MCTSConfig):
    """The search method and its model backend; the MCTS fields are inherited from ``MCTSConfig``."""

    method: str = "mcts"
    """Search method: mcts, gumbel (Gumbel MuZero), greedy, self_consistency, best_of_n, weighted_bon, step_beam."""
    step_delimiter: str = "\n"
    """Text that ends a reasoning step."""
    max_step_tokens: int = 48
    """A step longer than this is cut and marked truncated."""
    temperature: float = 1.0
    """Sampling temperature of the proposer."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the proposer."""
    max_batch_size: int = 64
    """Rows per forward batch in the model backend."""
    num_samples: int = 8
    """Best-of-N: number of independent samples."""
    beam_width: int = 4
    """Step beam search: beams kept per step."""
    cache_budget_bytes: int | None = None
    """Prefix-cache limit in bytes of stored K/V (or Mamba) state; null = a quarter of the device's memory."""
    process_check: bool = False
    """Process-checked rewards: a path through a step the task can prove wrong (arith, countdown equations) earns 0."""

    def mcts(self) -> MCTSConfig:
        """The plain ``MCTSConfig`` part of this section."""
        return MCTSConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MCTSConfig)})


@dataclass
class TrainConfig:
    algo: str = "grpo"
    """Policy algorithm: grpo, ppo, rft (expert iteration on the engine), dpo, sft (TRL)."""
    learning_rate: float = 1e-4
    """Optimiser learning rate."""
    per_device_batch_size: int = 8
    """Sequences per device per micro-batch."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    steps: int = 50
    """Optimiser steps per round."""
    clip_coef: float = 0.2
    """PPO/GRPO ratio clipping epsilon."""
    kl_coef: float = 0.0
    """KL penalty to the reference policy."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    advantage: str = "treerl"
    """GRPO/PPO rounds: per-step advantage from the tree (treerl, treerpo, grpo)."""
    dpo_beta: float = 0.1
    """DPO rounds: β of the DPO loss."""
    pair_min_margin: float = 0.1
    """DPO rounds: minimum Q gap of a sibling step pair."""
    loss_type: str = "dapo"
    """Loss normalisation: grpo (per-sequence mean), dr_grpo (sum / (batch x max len)), dapo (token mean)."""
    num_iterations: int = 1
    """Optimiser passes over each round's records (GRPO mu, PPO epochs); > 1 reuses the rollout logprobs."""
    clip_coef_high: float | None = None
    """Upper ratio clip epsilon (DAPO clip-higher); null = clip_coef."""
    max_completion_length: int | None = None
    """dr_grpo normalising constant; null = the longest completion of the step's batch."""
    gamma: float = 1.0
    """PPO discount per reasoning step."""
    gae_lambda: float = 0.95
    """PPO GAE lambda over reasoning steps."""
    vf_coef: float = 0.1
    """PPO value-loss coefficient."""
    cliprange_value: float = 0.2
    """PPO value clipping range around the old values."""
    norm_adv: bool = True
    """PPO: whiten the GAE advantages over the round's trained tokens."""
    lr_scheduler_type: str = "constant"
    """transformers LR scheduler name (constant, constant_with_warmup, linear, cosine, warmup_stable_decay); one
    schedule spans the run (an engine warm start, then rounds × steps); warmup_stable_decay decays over the rounds."""
    warmup_steps: int = 0
    """LR warm-up steps."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA when supported, none on CPU), no, bf16 or fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_entropy: bool = True
    """Log train/entropy (an extra no-grad softmax over the vocabulary per micro-batch)."""
    save_steps: int = 0
    """Save a resumable training checkpoint every N optimiser steps (0 = only at the end of the round)."""
    save_total_limit: int = 2
    """Resumable training checkpoints kept per round (oldest deleted first)."""
    control: str = "none"
    """Learning controls: none, random_reward (leaf rewards replaced by coin flips at the round's positive rate), or
    zero_update (everything but the optimiser step)."""
    on_collapse: str = "warn"
    """A round that cannot teach (no non-zero advantage, all-correct/all-wrong trees, entropy or KL past its bound):
    warn (log it) or stop (end the run after the round; a rerun resumes)."""
    entropy_floor: float = 0.02
    """Collapse check: mean token entropy (nats) of a round's training below this."""
    kl_ceiling: float = 0.5
    """Collapse check: a training step's approx-KL to the rollout policy above this."""
    pi_prime_coef: float = 0.0
    """GRPO / RFT rounds: add Gumbel MuZero's improved-policy targets, advantage coef·(π′(a) − p(a)) on every sampled
    child step of each searched node (trainer.signals.improved_policy); 0 = off."""
    pack_tokens: int = 0
    """Tree packing: 0 = unpacked; N = pack each step's shared path prefixes into sequences of at most N tokens."""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        _check_choice("train.control", self.control, ("none", "random_reward", "zero_update"))
        _check_choice("train.on_collapse", self.on_collapse, ("warn", "stop"))
        _check_choice("train.loss_type", self.loss_type, ("grpo", "dr_grpo", "dapo"))
        for name in ("per_device_batch_size", "grad_accum", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "save_steps", "learning_rate", "entropy_floor", "kl_ceiling",
                     "pi_prime_coef"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class WarmStartConfig:
    algo: str = "none"
    """Warm start before the rounds: sft (TRL's SFTTrainer on the task's worked solutions), engine (the same
    likelihood on the run's training engine, whose optimiser state and LR schedule then continue into the rounds), or
    none."""
    examples: int | None = None
    """Worked solutions used (the first N train rows; the rounds then search the other rows); null = all."""
    steps: int = 300
    """Optimiser steps of the warm start."""
    learning_rate: float = 1e-3
    """Warm-start learning rate."""
    per_device_batch_size: int = 32
    """Warm-start micro-batch size."""
    epochs: float | None = None
    """If set, train this many epochs instead of `steps`."""


@dataclass
class RoundsConfig:
    num_rounds: int = 0
    """Self-evolution rounds of search → signals → training."""
    prompts_per_round: int = 64
    """Train prompts searched per round (a fresh slice each round, cycling through the train split)."""
    traces_per_tree: int = 1
    """SFT / RFT rounds: top-k correct root-to-leaf paths per tree (ranked by Q)."""
    eval_every: int = 1
    """Evaluate the held-out split every N rounds (and after the last); rounds in between only search and train."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Optional supervised warm start."""


@dataclass
class EvalConfig:
    methods: list = field(default_factory=lambda: ["greedy", "mcts"])
    """Methods evaluated on the held-out split (greedy, best_of_n, step_beam, mcts)."""
    max_depth: int | None = None
    """Override of search.max_depth for evaluation (null = same as search)."""
    health: bool = True
    """Per-round health metrics: bits/char on correct traces, drift (KL from round 0), general-text NLL."""
    retained_task: str | None = None
    """Forgetting: a task the recipe does not train on, whose greedy accuracy is tracked (e.g. arith)."""
    retained_kwargs: dict = field(default_factory=dict)
    """Task knobs of the retained task."""
    retained_size: int = 32
    """Prompts of the retained task evaluated each round."""
    forgetting_threshold: float = 5.0
    """Warn when retained accuracy falls more than this many points below round 0."""
    on_forgetting: str = "warn"
    """What to do past the threshold: warn (log it) or stop (end the run after this round)."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Output directory (config.yaml, summary.json, trees, checkpoints)."""
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: tensorboard, wandb, or [] for none."""


@dataclass
class AblateConfig:
    cells: list = field(default_factory=list)
    """Grid cells for `thinktree ablate`: {method: M, <field>: value or [values]}, each a cartesian product."""
    prm: str | None = None
    """Process reward model directory: the value function of value-based cells (null = none; --prm overrides)."""
    warm_start_steps: int = 0
    """SFT steps on the task's solutions before the grid (lr, batch from rounds.warm_start; cached); 0 = none."""


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    seed: int = 0
    """Seed of every RNG in the run (data, search, training)."""


# --------------------------------------------------------------------------------------------------- checks


def _check_finite(section: Any, where: str) -> None:
    """Every float field of ``section`` finite (``nan``/``inf`` are YAML floats and would pass the type check)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {value}")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{hint}")


# --------------------------------------------------------------------------------------------------- mapping


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {where}{key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp`` (the subset of types recipes use)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return config_from_dict(value, tp, prefix=f"{where}.")
    if tp is Any:
        return value
    base = origin or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}")
    return value


def config_from_dict(data: dict, cls: type = RecipeConfig, prefix: str = "") -> Any:
    """Build ``cls`` from a nested dict; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(key, names, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'recipe'}: {e}") from e


def config_to_dict(cfg: Any) -> dict:
    """The nested plain-dict form of a config (what ``save_config`` writes)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested recipe dict, in order."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def normalise_cli_overrides(argv: list[str]) -> list[str]:
    """Turn ``--a.b value`` / ``--a.b=value`` / ``a.b=value`` command-line items into ``a.b=value`` strings."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--") and "=" not in item:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {item} has no value")
            out.append(f"{item[2:]}={argv[i + 1]}")
            i += 2
            continue
        out.append(item.removeprefix("--"))
        i += 1
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (or start from defaults when ``path`` is None) and apply CLI overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from e
    data = apply_overrides(data, normalise_cli_overrides(overrides or []))
    return config_from_dict(data, RecipeConfig)


def save_config(cfg: RecipeConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
