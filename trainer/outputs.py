"""The output directory of a run: the resolved config beside every output, and a guard against mixing runs.

``prepare_output_dir`` writes ``config.yaml`` the first time; when the directory already holds a run, the stored
config must match the new one (the ``output`` and ``ablate`` sections aside — ablation cells are identified by their
own hash — and fields added to the schema since count as their defaults), else :class:`ConfigError` names the differing fields and
nothing is written. That is what makes resuming safe: a restarted run continues only its own work.

JSON written here is strict: ``write_json_atomic`` and ``dumps_finite`` write a NaN or infinite number as ``null``
(and log the fields), never as the ``NaN`` / ``Infinity`` literals other JSON readers reject.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from thinktree.trainer.config import ConfigError, RecipeConfig, config_from_dict, config_to_dict

__all__ = [
    "check_output_dir",
    "prepare_output_dir",
    "write_json_atomic",
    "config_diff",
    "finite_json",
    "dumps_finite",
]

logger = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = ("output.", "ablate.")) -> list[str]:
    """Human-readable ``key: old → new`` lines for the fields that differ (keys under ``ignore`` skipped)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignore):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            lines.append(f"{key}: {a.get(key, '<missing>')!r} → {b.get(key, '<missing>')!r}")
    return lines


def finite_json(data: Any, where: str = "") -> tuple[Any, list[str]]:
    """``data`` with every NaN or infinite number replaced by ``None`` (numpy scalars become floats), and the
    paths of the replaced values (``rounds[0].loss``)."""
    if isinstance(data, dict):
        out, bad = {}, []
        for k, v in data.items():
            out[k], sub = finite_json(v, f"{where}.{k}" if where else str(k))
            bad += sub
        return out, bad
    if isinstance(data, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(data)]
        return [v for v, _ in items], [b for _, sub in items for b in sub]
    if isinstance(data, numbers.Real) and not isinstance(data, numbers.Integral):
        value = float(data)
        return (value, []) if math.isfinite(value) else (None, [where or "<value>"])
    return data, []


def dumps_finite(data: Any, what: str = "JSON", **kwargs: Any) -> str:
    """``json.dumps`` with non-finite numbers as ``null`` (logged with ``what``, e.g. the file, and the fields)."""
    clean, bad = finite_json(data)
    if bad:
        logger.warning("%s: non-finite numbers written as null: %s", what, ", ".join(bad[:10]))
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over ``path`` (NaN/inf as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_finite(data, str(path), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output_dir(cfg: RecipeConfig) -> Path:
    """Raise :class:`ConfigError` when ``cfg.output.dir`` holds a run of a different recipe; writes nothing.

    Call it first, check the model, task and data, then :func:`prepare_output_dir`: a run refused by a check then
    leaves no ``config.yaml`` behind to block its corrected rerun."""
    out = Path(cfg.output.dir)
    stored = out / "config.yaml"
    if stored.exists():
        old = yaml.safe_load(stored.read_text()) or {}
        try:  # fill fields added to the schema since that run with their defaults: a new knob is not a new recipe
            old = config_to_dict(config_from_dict(old))
        except ConfigError:
            pass  # a field was removed or retyped since: compare as stored, the diff names it
        diff = config_diff(old, config_to_dict(cfg))
        if diff:
            raise ConfigError(
                f"output dir {out} holds a run of a different recipe; refusing to mix them "
                f"(choose another output.dir or delete it). Differences: " + "; ".join(diff)
            )
    return out


def prepare_output_dir(cfg: RecipeConfig) -> Path:
    """Create ``cfg.output.dir`` and write ``config.yaml``, or check that the run already there is this recipe."""
    out = check_output_dir(cfg)
    stored = out / "config.yaml"
    if stored.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".config.")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, stored)
    return out
