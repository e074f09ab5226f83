"""GGUF files as Hugging Face directories: each ``.gguf`` file is converted ONCE into a cached fp32 safetensors
HF directory (model and tokenizer, chat template kept) that :func:`thinktree.trainer.models.load_policy` then loads
like any HF directory (about a second, against ~35 s for a conversion on 2 CPU cores).

GGUF cache. A conversion is stored in ``<root>/<file stem>-<hash>`` where the hash covers the GGUF file's resolved
path, size and mtime (a replaced or touched file gets a fresh conversion). ``root`` is the ``cache_dir`` argument
when given, else ``$THINKTREE_CACHE/gguf``, else ``~/.cache/thinktree/gguf``. A conversion is written into a hidden
``.<name>.partial-*`` folder beside its final place and renamed into place only when complete, so a killed conversion
never leaves a half cache (leftover partial folders are removed by the next conversion of the same file). An exclusive
file lock (POSIX) makes concurrent processes, e.g. the ranks of one ``accelerate launch``, convert once and share.
``save_pretrained`` refuses a GGUF-loaded model, so the converter drops ``hf_quantizer`` and
``config.quantization_config`` first: the weights are already dequantised to fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["GGUF_MARKER", "convert_gguf", "gguf_cache_dir", "gguf_cache_root"]

GGUF_MARKER = (
    "thinktree-gguf.json"  # written last into a conversion: its presence means the cache is complete
)


def gguf_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where GGUF conversions live: ``cache_dir``, else ``$THINKTREE_CACHE/gguf``, else ``~/.cache/thinktree/gguf``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("THINKTREE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "thinktree"
    return base / "gguf"


def gguf_cache_dir(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The cache folder for one GGUF file: ``<root>/<stem>-<hash of resolved path, size, mtime>``."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return gguf_cache_root(cache_dir) / f"{path.stem}-{key}"


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    convert: Callable[[Path, Path], None] | None = None,
) -> Path:
    """The cached fp32 safetensors HF directory of a GGUF file, converting it first if there is none yet.

    ``convert(gguf_file, out_dir)`` writes one conversion (default: :func:`_convert_into`, through transformers).
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    target = gguf_cache_dir(path, cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        for leftover in target.parent.glob(
            f".{target.name}.partial-*"
        ):  # only a killed conversion leaves these
            shutil.rmtree(leftover, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            (convert or _convert_into)(path, partial)
            if target.exists():  # a folder without the marker: not ours to trust
                shutil.rmtree(target)
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _convert_into(path: Path, out: Path) -> None:
    import transformers

    logger.info("converting GGUF %s once into an fp32 safetensors cache at %s (~30 s on 2 cores)", path, out)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"could not convert GGUF file {path}: {type(e).__name__}: {e}") from e
    _strip_gguf_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = path.stat()
    marker = {
        "source": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _is_complete(folder: Path) -> bool:
    return (folder / GGUF_MARKER).is_file() and (folder / "config.json").is_file()


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dequantised) model savable: ``save_pretrained`` refuses it otherwise."""
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    method = getattr(quant_config, "quant_method", None)
    if method is None and isinstance(quant_config, Mapping):
        method = quant_config.get("quant_method")
    if quantizer is None and quant_config is None:
        return
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path`` (POSIX ``flock``; released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic rename still keeps the cache whole
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
