"""``thinktree ablate``: a grid over search settings, all cells on the same prompts, policy and seed.

    thinktree ablate --config recipes/ablate_arith.yaml [--checkpoint DIR] [--prm DIR] [section.field=value ...]

The grid is the recipe's ``ablate.cells``: a list of entries ``{method: M, <field>: value or [values, ...]}``, each
expanded as a cartesian product over its list-valued fields, so every method gets its own sweep::

    ablate:
      cells:
        - {method: greedy}
        - {method: self_consistency, num_samples: [2, 4, 8]}
        - {method: mcts, num_simulations: [4, 8, 16], c_puct: [1.0, 2.0]}
        - {method: gumbel, num_simulations: [2, 4, 8], c_scale: [0.1, 1.0]}
        - {method: compute_optimal, base_method: self_consistency, rule: [snell, uniform], total_budget: [4, 8]}

Fields are ``search`` fields (``SearchConfig``: num_simulations, num_children, c_puct, evaluation, lambda_mix,
temperature, token_budget, num_samples, beam_width, ...) that the method uses, plus ``budget`` as an alias of the
method's budget field (num_samples for best-of-N, beam_width for step beam, num_simulations for MCTS and gumbel,
total_budget for compute_optimal). gumbel takes the MCTS fields except the PUCT/Dirichlet ones (select, c_puct,
pb_c_base, pb_c_init, dirichlet_alpha, dirichlet_fraction, fill_q) plus gumbel_scale, c_visit and c_scale, which
mcts does not take. ``compute_optimal`` cells (see ``thinktree.trainer.allocation``) take
base_method, total_budget, rule, probe_samples and num_bins. An unknown method or field, a field the method does not
use, a value-based cell without a PRM, or an empty grid is a :class:`ConfigError` before anything runs.

Every cell runs on the task's test split (``task.eval_size`` prompts, ``seed``), with a fresh random stream seeded
by ``seed``, so a cell's numbers do not depend on the other cells. The policy is ``--checkpoint`` (checked against
the recipe's model) or ``model.policy``, optionally after ``ablate.warm_start_steps`` of SFT on the task's worked
solutions (cached in ``<output.dir>/ablate/warm_start/checkpoint``). The PRM (``--prm`` or ``ablate.prm``) is the
value function of the cells that use one (best_of_n, weighted_bon, step_beam, MCTS value/mixed, compute_optimal).

Outputs in ``<output.dir>/ablate/``: ``cells.jsonl`` (one line per finished cell, appended as it finishes; a rerun
skips the cells already there, identified by a hash of the method, the resolved search settings, the policy and the
PRM), ``results.csv``, ``results.md`` and ``accuracy_vs_tokens.png``. The output directory is guarded by
``prepare_output_dir``: a directory holding a different recipe is refused and nothing is written.

Departures: wall time is per cell on this machine (shared CPUs make it noisy); ``cpu_time_s`` (process CPU time)
is reported beside it as the load-independent cost.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinktree.search.gumbel import GUMBEL_FIELDS, IGNORED_FIELDS
from thinktree.search.mcts import MCTSConfig
from thinktree.trainer import searching
from thinktree.trainer.allocation import BASE_BUDGET_FIELD, CO_DEFAULTS, check_options, run_compute_optimal
from thinktree.trainer.config import ConfigError, RecipeConfig, SearchConfig, config_from_dict, config_to_dict

__all__ = ["ALL_METHODS", "Cell", "expand_grid", "run_cell", "run_ablate_command", "write_reports"]

ALL_METHODS = (*searching.METHODS, "compute_optimal")
BUDGET_FIELD: dict[str, str | None] = {"greedy": None, **BASE_BUDGET_FIELD, "compute_optimal": "total_budget"}
_SAMPLING = ("temperature", "top_p", "max_step_tokens", "step_delimiter", "max_batch_size", "max_depth")
_BON = (*_SAMPLING, "num_samples")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "greedy": tuple(f for f in _SAMPLING if f not in ("temperature", "top_p")),
    "self_consistency": _BON,
    "best_of_n": _BON,
    "weighted_bon": _BON,
    "step_beam": (*_SAMPLING, "beam_width", "num_children"),
    "mcts": (
        *_SAMPLING,
        *(f.name for f in dataclasses.fields(MCTSConfig) if f.name not in ("max_depth", *GUMBEL_FIELDS)),
    ),
    "gumbel": (
        *_SAMPLING,
        *(f.name for f in dataclasses.fields(MCTSConfig) if f.name not in ("max_depth", *IGNORED_FIELDS)),
    ),
}
"""The search fields each method uses (a cell may set only these)."""
METRICS = ("accuracy", "pass_at_k", "generated_tokens", "tokens_per_prompt", "wall_time_s", "cpu_time_s")


@dataclass(frozen=True)
class Cell:
    """One grid cell: a method, the settings its entry gave (in entry order) and the resolved search config."""

    method: str
    settings: tuple[tuple[str, Any], ...]
    search: SearchConfig
    options: tuple[tuple[str, Any], ...] = ()
    """compute_optimal settings (base_method, rule, total_budget, probe_samples, num_bins), defaults filled."""

    @property
    def budget(self) -> Any:
        """The value of the method's budget field (None for greedy)."""
        name = BUDGET_FIELD[self.method]
        if name is None:
            return None
        return dict(self.options)[name] if self.method == "compute_optimal" else getattr(self.search, name)

    def label(self) -> str:
        """Method plus its non-budget settings: one curve of the plot."""
        skip = {BUDGET_FIELD[self.method], "rule", "base_method"}
        extra = [f"{k}={v}" for k, v in self.settings if k not in skip]
        name = self.method
        if self.method == "compute_optimal":
            name = f"compute_optimal[{dict(self.options)['rule']}] of {dict(self.options)['base_method']}"
        return name + (f" ({', '.join(extra)})" if extra else "")

    def key(self, context: dict[str, Any]) -> str:
        """Identity hash: method, resolved search settings, options and ``context`` (policy, PRM, prompts)."""
        blob = {"method": self.method, "search": config_to_dict(self.search), "options": dict(self.options)}
        text = json.dumps({**blob, **context}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def needs_prm(self) -> bool:
        """Whether the cell cannot run without a value function."""
        method = dict(self.options).get("base_method", self.method)
        searched = method in ("mcts", "gumbel")
        return method == "weighted_bon" or (searched and self.search.evaluation != "rollout")

    def uses_prm(self) -> bool:
        """Whether the cell uses a value function when one is given."""
        return self.method in ("best_of_n", "step_beam", "compute_optimal") or self.needs_prm()


def _unknown(where: str, name: str, allowed: list[str], method: str) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{where}: unknown field {name!r} for method {method!r}{hint}; fields it takes: {', '.join(sorted(allowed))}"
    )


def _allowed(method: str, base_method: str | None) -> list[str]:
    if method != "compute_optimal":
        return [*METHOD_FIELDS[method], "budget"]
    base = [
        f for f in METHOD_FIELDS.get(base_method or "", ()) if f != BASE_BUDGET_FIELD.get(base_method or "")
    ]
    return [*CO_DEFAULTS, "total_budget", "budget", *base]


def _make_cell(method: str, settings: dict[str, Any], base: SearchConfig, where: str) -> Cell:
    if "budget" in settings:
        if BUDGET_FIELD[method] is None:
            raise ConfigError(f"{where}: method {method!r} has no budget to sweep")
        if BUDGET_FIELD[method] in settings:
            raise ConfigError(f"{where}: give either budget or {BUDGET_FIELD[method]}, not both")
        settings = {(BUDGET_FIELD[method] if k == "budget" else k): v for k, v in settings.items()}
    base_method = (
        settings.get("base_method", CO_DEFAULTS["base_method"]) if method == "compute_optimal" else None
    )
    if method == "compute_optimal" and base_method not in BASE_BUDGET_FIELD:
        raise ConfigError(
            f"{where}: unknown base_method {base_method!r}; choose one of {list(BASE_BUDGET_FIELD)}"
        )
    allowed = _allowed(method, base_method)
    for name in settings:
        if name not in allowed:
            raise _unknown(
                where, name, allowed, method if base_method is None else f"compute_optimal/{base_method}"
            )
    options: dict[str, Any] = {}
    if method == "compute_optimal":
        options = {
            **CO_DEFAULTS,
            **{k: v for k, v in settings.items() if k in CO_DEFAULTS or k == "total_budget"},
        }
        if "total_budget" not in options:
            raise ConfigError(f"{where}: compute_optimal needs total_budget (mean budget units per prompt)")
        try:
            check_options(**options)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
    fields = {k: v for k, v in settings.items() if k not in options}
    resolved = {**config_to_dict(base), **fields, "method": base_method or method}
    search = config_from_dict(resolved, SearchConfig, prefix=f"{where}.")
    return Cell(method, tuple(settings.items()), search, tuple(sorted(options.items())))


def expand_grid(spec: list, base: SearchConfig) -> list[Cell]:
    """All cells of ``ablate.cells`` (each entry a cartesian product of its list-valued fields), duplicates dropped."""
    if not spec:
        raise ConfigError(
            "ablate.cells is empty: nothing to ablate; give cells like {method: mcts, num_simulations: [4, 8, 16]}"
        )
    cells: list[Cell] = []
    for i, entry in enumerate(spec):
        where = f"ablate.cells[{i}]"
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"{where}: expected a mapping with a 'method' key, got {entry!r}")
        method = entry["method"]
        if method not in ALL_METHODS:
            raise ConfigError(f"{where}: unknown method {method!r}; choose one of {list(ALL_METHODS)}")
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in entry.items() if k != "method"}
        for name, values in axes.items():
            if not values:
                raise ConfigError(f"{where}: field {name!r} has an empty list of values")
        for combo in itertools.product(*axes.values()):
            cell = _make_cell(method, dict(zip(axes, combo)), base, where)
            if all(cell != c for c in cells):
                cells.append(cell)
    return cells


@dataclass
class Context:
    """What every cell shares: the policy, the task and its prompts, the value function, the seed."""

    model: Any
    tokenizer: Any
    task: Any
    prompts: list
    value_fn: Any = None
    seed: int = 0


def run_cell(cell: Cell, ctx: Context) -> dict[str, Any]:
    """Run one cell on ``ctx.prompts``; returns ``summarize``-style metrics plus ``cpu_time_s``."""
    cfg = cell.search
    temperature = 0.0 if cell.method == "greedy" else None
    proposer = searching.make_proposer(ctx.model, ctx.tokenizer, cfg, temperature)
    outcome_fn = searching.make_outcome_fn(ctx.task)
    value_fn = ctx.value_fn if cell.uses_prm() else None
    rng = np.random.default_rng(ctx.seed)
    start, cpu = time.perf_counter(), time.process_time()
    if cell.method == "compute_optimal":
        summary = run_compute_optimal(
            ctx.prompts, proposer, outcome_fn, cfg, rng, answer_fn=ctx.task.extract_answer, value_fn=value_fn,
            run_method=searching.run_method, **dict(cell.options),
        )  # fmt: skip
    else:
        results = searching.run_method(
            cell.method, ctx.prompts, proposer, outcome_fn, cfg, rng, answer_fn=ctx.task.extract_answer,
            value_fn=value_fn,
        )  # fmt: skip
        summary = searching.summarize(results, wall_s=time.perf_counter() - start)
    summary["wall_time_s"] = time.perf_counter() - start
    summary["cpu_time_s"] = time.process_time() - cpu
    return summary


class CellLog:
    """``cells.jsonl``: finished cells by key; a torn last line (a killed write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[rec["key"]] = rec

    def add(self, rec: dict) -> None:
        text = self.path.read_text() if self.path.exists() else ""
        with open(self.path, "a") as f:
            if text and not text.endswith("\n"):
                f.write("\n")  # end a torn line so the new record stays parseable
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
        self.done[rec["key"]] = rec


def _row(cell: Cell, key: str, metrics: dict, columns: list[str]) -> dict[str, Any]:
    used = _allowed(cell.method, dict(cell.options).get("base_method"))
    values = {**config_to_dict(cell.search), **dict(cell.options)}
    row: dict[str, Any] = {"cell": key, "method": cell.method, "budget": cell.budget, "label": cell.label()}
    row.update({c: values.get(c) if c in used else None for c in columns})
    row["settings"] = ", ".join(f"{k}={v}" for k, v in cell.settings if k != BUDGET_FIELD[cell.method])
    row.update({m: metrics.get(m) for m in METRICS})
    return row


def _setting_columns(cells: list[Cell]) -> list[str]:
    cols: list[str] = []
    for c in cells:
        for k, _ in c.settings:
            if k not in cols and k != BUDGET_FIELD[c.method]:
                cols.append(k)
    return cols


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return ""
    return f"{100 * v:.1f}" if pct else f"{v:.1f}" if isinstance(v, float) else str(v)


def write_reports(rows: list[dict], columns: list[str], out: Path, header: str) -> None:
    """``results.csv`` (every column), ``results.md`` (a compact table) and ``accuracy_vs_tokens.png``."""
    fields = ["cell", "method", "budget", *columns, *METRICS]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
        )
    (out / "results.md").write_text(f"{header}\n\n{format_table(rows)}\n")
    plot_accuracy_vs_tokens(rows, out / "accuracy_vs_tokens.png", title=header.splitlines()[0].lstrip("# "))


def format_table(rows: list[dict]) -> str:
    """Markdown table: method, budget, settings, accuracy %, pass@k %, tokens, tokens per prompt, times."""
    head = "method|budget|settings|accuracy %|pass@k %|tokens|tokens/prompt|wall s|cpu s".split("|")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], _fmt(r["budget"]), r["settings"], _fmt(r["accuracy"], True),
                 _fmt(r["pass_at_k"], True), _fmt(r["generated_tokens"]), _fmt(r["tokens_per_prompt"]),
                 _fmt(r["wall_time_s"]), _fmt(r["cpu_time_s"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_tokens(rows: list[dict], path: Path, title: str = "") -> None:
    """Accuracy (%) against generated tokens per prompt, one curve per method (+ non-budget settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    curves: dict[str, list[dict]] = {}
    for r in rows:
        curves.setdefault(r["label"], []).append(r)
    markers = itertools.cycle("os^Dv<>pP*X")
    colors = itertools.cycle(plt.get_cmap("tab10").colors)
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda r: r["tokens_per_prompt"])
        xs, ys = [p["tokens_per_prompt"] for p in pts], [100 * p["accuracy"] for p in pts]
        style = "none" if len(pts) == 1 else "--" if pts[0]["method"] == "compute_optimal" else "-"
        ax.plot(xs, ys, marker=next(markers), color=next(colors), linestyle=style, label=label)
        for p, x, y in zip(pts, xs, ys):
            if p["budget"] is not None:
                ax.annotate(str(p["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    tokens = [r["tokens_per_prompt"] for r in rows if r["tokens_per_prompt"]]
    if tokens and max(tokens) / min(tokens) > 8:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(
        "generated tokens per prompt (log scale)"
        if ax.get_xscale() == "log"
        else "generated tokens per prompt"
    )
    ax.set_ylabel("accuracy (% of prompts)")
    ax.set_title(title or "Accuracy vs test-time compute", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method (point labels: budget)", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _policy(cfg: RecipeConfig, out: Path, checkpoint: str | None) -> tuple[Any, Any, str]:
    """Load the policy (``checkpoint`` or the recipe's, after the cached warm start if configured)."""
    from thinktree.trainer.models import load_policy

    steps = cfg.ablate.warm_start_steps
    cached = out / "warm_start" / "checkpoint"
    spec = checkpoint or (str(cached) if steps > 0 and cached.is_dir() else cfg.model.policy)
    lora = cfg.model.lora if spec == cfg.model.policy else None
    model, tokenizer = load_policy(
        spec, dtype=cfg.model.dtype, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes, lora=lora
    )
    if checkpoint:
        return model, tokenizer, str(Path(checkpoint).resolve())
    if steps > 0 and spec == cfg.model.policy:
        _warm_start(cfg, model, tokenizer, out)
    return model, tokenizer, cfg.model.policy + (f" + sft{steps}" if steps > 0 else "")


def _warm_start(cfg: RecipeConfig, model: Any, tokenizer: Any, out: Path) -> None:
    from datasets import Dataset

    from thinktree.rewards import get_task
    from thinktree.trainer.algos.sft import SFTSettings, train_sft
    from thinktree.trainer.models import save_policy

    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.load("train", n=cfg.task.train_size, seed=cfg.seed)
    if "solution" not in rows.column_names:
        raise ConfigError(f"task {task.name!r} has no worked solutions for ablate.warm_start_steps")
    prompts = searching.make_prompts(task, rows, tokenizer, cfg.model.use_chat_template)
    data = Dataset.from_list(
        [{"prompt": p.prompt, "completion": s} for p, s in zip(prompts, rows["solution"])]
    )
    w = cfg.rounds.warm_start
    settings = SFTSettings(steps=cfg.ablate.warm_start_steps, learning_rate=w.learning_rate,
                           per_device_batch_size=w.per_device_batch_size, seed=cfg.seed)  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    metrics = train_sft(model, tokenizer, data, settings, out / "warm_start" / "trainer")
    save_policy(model, tokenizer, out / "warm_start" / "checkpoint")
    record = {"steps": settings.steps, "train_loss": metrics.get("train_loss"),
              "wall_time_s": time.perf_counter() - start, "cpu_time_s": time.process_time() - cpu}  # fmt: skip
    (out / "warm_start" / "record.json").write_text(json.dumps(record, indent=2))
    print(f"warm start: {json.dumps(record)}")


def run_ablate_command(
    cfg: RecipeConfig, *, checkpoint: str | None = None, prm: str | None = None
) -> list[dict]:
    """``thinktree ablate``: run (or resume) the recipe's grid; writes the JSONL, CSV, markdown table and plot."""
    from thinktree.rewards import get_task
    from thinktree.trainer.evaluate import _load_value_fn, check_checkpoint
    from thinktree.trainer.outputs import prepare_output_dir

    cells = expand_grid(cfg.ablate.cells, cfg.search)
    prm = prm or cfg.ablate.prm
    missing = [c.label() for c in cells if c.needs_prm()] if not prm else []
    if missing:
        raise ConfigError(f"these cells need a PRM (--prm DIR or ablate.prm): {missing}")
    if checkpoint:
        check_checkpoint(cfg, checkpoint)
    out = prepare_output_dir(cfg) / "ablate"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, policy = _policy(cfg, out, checkpoint)
    model.eval()
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    prompts = searching.make_prompts(task, rows, tokenizer, cfg.model.use_chat_template)
    ctx = Context(model, tokenizer, task, prompts, _load_value_fn(prm) if prm else None, cfg.seed)
    context = {"policy": policy, "prm": str(Path(prm).resolve()) if prm else None, "prompts": len(prompts)}
    log = CellLog(out / "cells.jsonl")
    keys = [c.key(context) for c in cells]
    done = sum(1 for k in keys if k in log.done)
    print(f"ablate: {len(cells)} cells on {len(prompts)} prompts; {done} already done in {log.path}")
    start = time.perf_counter()
    for n, (cell, key) in enumerate(zip(cells, keys), start=1):
        if key in log.done:
            continue
        metrics = run_cell(cell, ctx)
        log.add({"key": key, "method": cell.method, "settings": dict(cell.settings), "options": dict(cell.options),
                 "context": context, "metrics": metrics})  # fmt: skip
        print(f"[{n}/{len(cells)}] {cell.label()} budget={cell.budget}: accuracy {metrics['accuracy']:.3f}, "
              f"{metrics['tokens_per_prompt']:.1f} tok/prompt, {metrics['wall_time_s']:.1f} s")  # fmt: skip
    columns = _setting_columns(cells)
    table = [_row(c, k, log.done[k]["metrics"], columns) for c, k in zip(cells, keys)]
    warm = out / "warm_start" / "record.json"
    w = json.loads(warm.read_text()) if warm.exists() and not checkpoint else None
    warm_note = (
        f"; warm start: {w['steps']} SFT steps, {w['wall_time_s']:.0f} s wall, {w['cpu_time_s']:.0f} s CPU"
        if w
        else ""
    )
    header = (f"# Ablation: {cfg.task.name} test split, {len(prompts)} prompts, seed {cfg.seed}\n\n"
              f"policy: {policy}; PRM: {prm or 'none'}; grid this run: {time.perf_counter() - start:.1f} s wall"
              f"{warm_note}")  # fmt: skip
    write_reports(table, columns, out, header)
    print(format_table(table))
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'accuracy_vs_tokens.png'}")
    return table
