"""Code-augmented reasoning steps (rStar-Math style): run a step's Python and append its output.

A step may contain fenced Python blocks (```` ```python ```` / ```` ```py ````). :func:`execute_step` runs
them (all blocks of the step, in order, as one program) in the sandbox (:mod:`thinktree.rewards.sandbox`) and
returns the step text with the execution output appended in a fixed format::

    <step text, ending with a newline>```output
    <stdout, then the error line if it failed>
    ```

A step without a (closed) code block is returned unchanged. An output block after the last code block is
never trusted: a complete one (model-written, or from an earlier execution) is replaced by the real output
in place, and a dangling ```` ```output ```` opener at the end (the generation's stop string, kept by some
backends) is completed. Re-executing an executed step therefore gives the same text (for deterministic code);
use :func:`has_output` to skip steps that were executed already. ``prelude`` is code from earlier steps (see :func:`collect_code`): it runs first with its
stdout discarded, so the variables it defines are available while only the current step's output is shown.
Sandbox failures (not the code's) raise :class:`~thinktree.rewards.sandbox.SandboxError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future

from thinktree.rewards.sandbox import SandboxPool, SandboxResult, run_code

__all__ = [
    "OUTPUT_TEMPLATE",
    "collect_code",
    "execute_step",
    "execute_steps",
    "extract_code_blocks",
    "format_output",
    "has_output",
]

OUTPUT_TEMPLATE = "```output\n{body}\n```\n"
CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
OUTPUT_BLOCK_RE = re.compile(r"```[ \t]*output[ \t]*\r?\n", re.IGNORECASE)
_FULL_OUTPUT_RE = re.compile(
    r"[ \t]*```[ \t]*output[ \t]*\r?\n.*?```[ \t]*(?:\r?\n|$)", re.DOTALL | re.IGNORECASE
)
_DANGLING_OUTPUT_RE = re.compile(r"\s*```[ \t]*output[ \t]*\s*$", re.IGNORECASE)
TRUNCATED_NOTE = "[output truncated]"


def extract_code_blocks(step_text: str) -> list[str]:
    """Contents of the closed ```` ```python ```` (or ``py``/``python3``) fenced blocks, in order."""
    return [m.group(1) for m in CODE_BLOCK_RE.finditer(step_text or "")]


def has_output(step_text: str) -> bool:
    """True if an output block follows the last code block (the step was already executed)."""
    matches = list(CODE_BLOCK_RE.finditer(step_text or ""))
    last = matches[-1] if matches else None
    return last is not None and OUTPUT_BLOCK_RE.search(step_text, last.end()) is not None


def collect_code(steps: Sequence[str]) -> str:
    """The code of earlier steps, concatenated (to pass as ``prelude``)."""
    return "\n".join(block for step in steps for block in extract_code_blocks(step))


def format_output(result: SandboxResult, max_chars: int | None = None) -> str:
    """The body of the output block: stdout, then a one-line reason if the run failed."""
    parts = [result.stdout.rstrip("\n")] if result.stdout.strip() else []
    if result.truncated:
        parts.append(TRUNCATED_NOTE)
    if result.timed_out:
        parts.append(f"TimeoutError: {result.error}")
    elif not result.ok and result.error:
        parts.append(result.error)
    body = "\n".join(parts)
    if max_chars is not None and len(body) > max_chars:
        body = body[:max_chars] + "\n" + TRUNCATED_NOTE
    return body


def _program(code: str, prelude: str) -> str:
    if not prelude.strip():
        return code
    return (
        "import os as _tt_os, sys as _tt_sys\n"
        "_tt_stdout, _tt_sys.stdout = _tt_sys.stdout, open(_tt_os.devnull, 'w')\n"
        "try:\n"
        f"    exec(compile({prelude!r}, '<previous steps>', 'exec'))\n"
        "finally:\n"
        "    _tt_sys.stdout.close()\n"
        "    _tt_sys.stdout = _tt_stdout\n"
        "del _tt_os, _tt_sys, _tt_stdout\n" + code
    )


def _with_output(step_text: str, body: str) -> str:
    """Put the real output after the last code block, replacing a model-written/stale one."""
    block = OUTPUT_TEMPLATE.format(body=body)
    last = list(CODE_BLOCK_RE.finditer(step_text))[-1]
    head, tail = step_text[: last.end()], step_text[last.end() :]
    if not head.endswith("\n"):
        head += "\n"
        tail = tail[1:] if tail.startswith("\n") else tail
    if _DANGLING_OUTPUT_RE.fullmatch(tail):
        return head + block
    stale = _FULL_OUTPUT_RE.match(tail.lstrip("\r\n"))
    if stale is not None:
        return head + block + tail.lstrip("\r\n")[stale.end() :]
    return head + block + tail


def execute_step(
    step_text: str, *, prelude: str = "", pool: SandboxPool | None = None, **sandbox_kwargs: object
) -> str:
    """The step with its code's real output after the last code block (unchanged if it has no code).

    ``sandbox_kwargs`` go to :func:`~thinktree.rewards.sandbox.run_code` (``timeout_s``, ``memory_mb``, ...).
    """
    blocks = extract_code_blocks(step_text)
    if not blocks:
        return step_text
    program = _program("\n".join(blocks), prelude)
    result = pool.run(program, **sandbox_kwargs) if pool is not None else run_code(program, **sandbox_kwargs)  # type: ignore[arg-type]
    return _with_output(step_text, format_output(result, _max_chars(pool, sandbox_kwargs)))


def execute_steps(
    texts: Sequence[str],
    pool: SandboxPool | None = None,
    *,
    preludes: Sequence[str] | None = None,
    **sandbox_kwargs: object,
) -> list[str]:
    """Batched :func:`execute_step`: the steps with code run in parallel on ``pool`` (a temporary pool if
    None); the others come back unchanged. ``preludes[i]`` is the prelude of ``texts[i]``."""
    if preludes is not None and len(preludes) != len(texts):
        raise ValueError(f"{len(preludes)} preludes for {len(texts)} texts")
    own = pool is None
    pool = pool or SandboxPool()
    try:
        futures: list[Future[SandboxResult] | None] = []
        for i, text in enumerate(texts):
            blocks = extract_code_blocks(text)
            if not blocks:
                futures.append(None)
                continue
            prelude = preludes[i] if preludes is not None else ""
            futures.append(pool.submit(_program("\n".join(blocks), prelude), **sandbox_kwargs))
        max_chars = _max_chars(pool, sandbox_kwargs)
        return [
            text if fut is None else _with_output(text, format_output(fut.result(), max_chars))
            for text, fut in zip(texts, futures)
        ]
    finally:
        if own:
            pool.close()


def _max_chars(pool: SandboxPool | None, sandbox_kwargs: dict[str, object]) -> int:
    merged = {**(pool.defaults if pool is not None else {}), **sandbox_kwargs}
    cap = merged.get("max_output_bytes", 4096)
    return int(cap) if isinstance(cap, int) else 4096
