"""``thinktree view``: a self-contained HTML page for browsing search trees.

    thinktree view trees.jsonl [--out trees.html] [--signals signals.jsonl] [--tree KEY | --max-trees N]

Every step is a collapsible node (``<details>``) showing visits N, Q (``Tree.q``: mean or max backup), prior P,
reward r, last value v, the ``Node.extra`` scores (``value_fn`` = PRM, ``beam_score``, ...) and, for terminal
nodes, ✓ (reward >= 0.5) or ✗; its background runs red → green with Q in [0, 1] (grey: never visited). With a
signals JSONL (records of ``step_pairs``, ``tree_advantages``, ``sft_traces``, matched to trees by ``key``) the
chosen / rejected steps of preference pairs, the per-step advantages and the SFT trace leaves are badged.

No network: inline CSS and one inline script (the Content-Security-Policy admits only it, by hash), system
fonts. Model text is HTML-escaped. The trees file is only read (``TreeStore`` would cut a partial last line in
place), so a store that a search is still appending to can be viewed safely.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from thinktree.search.tree import NO_PARENT, ROOT, Tree

__all__ = ["OPEN_DEPTH", "NodeMarks", "load_jsonl", "load_trees", "node_marks", "render_html", "view_main"]

OPEN_DEPTH = 3  # nodes at a depth below this start expanded; deeper subtrees start collapsed
CORRECT = 0.5  # a terminal reward >= this is shown as correct (✓)
EXTRA_LABELS = {"value_fn": "PRM", "prm": "PRM", "prm_score": "PRM", "beam_score": "beam"}

CSS = """
:root{--fg:#1d2330;--muted:#5b6474;--line:#c9ced8}*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--fg);background:#f6f7f9}
.bar{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;gap:10px;align-items:center;padding:8px 16px;
background:#243044;color:#fff;box-shadow:0 1px 4px #0004}
.bar h1{font-size:16px;margin:0 8px 0 0}
.bar select,.bar button{font:inherit;padding:3px 8px;border-radius:4px;border:1px solid #8896ad}
.scale{display:inline-block;width:110px;height:12px;border-radius:3px;vertical-align:middle;
background:linear-gradient(90deg,hsl(0,70%,86%),hsl(60,70%,86%),hsl(120,70%,86%));border:1px solid #fff8}
.legend{font-size:12px;color:#dbe2ee}main{padding:12px 16px}
section.tree{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px;
margin-bottom:18px}
section.tree h2{margin:0 0 6px;font-size:17px}
.facts{display:flex;flex-wrap:wrap;gap:4px 16px;margin-bottom:8px;color:var(--muted)}.facts b{color:var(--fg)}
details.prompt>summary{cursor:pointer;color:var(--muted)}
pre{font:13px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre-wrap;
overflow-wrap:anywhere;margin:2px 0 0}
details.prompt pre{max-height:14em;overflow:auto;background:#f1f3f6;padding:6px 8px;border-radius:4px}
ul.kids{list-style:none;margin:0;padding-left:22px;border-left:1px dashed #b7bfcc;margin-left:9px}
ul.top{list-style:none;margin:8px 0 0;padding:0}li.n{margin:3px 0}summary{list-style:none;cursor:pointer}
summary::-webkit-details-marker{display:none}
.card{display:flex;gap:6px;align-items:flex-start;background:var(--bg);border:1px solid var(--bd);
border-left:5px solid var(--bd);border-radius:6px;padding:2px 8px 3px}
.card.unvisited{opacity:.8;border-style:dashed}.card.path{box-shadow:0 0 0 2px #2456c9}
.tog{width:14px;flex:none;color:#334;font-size:12px;padding-top:2px}
details[open]>summary .tog::before{content:"\\25BE"}details:not([open])>summary .tog::before{content:"\\25B8"}
.leaf .tog::before{content:"\\2022";color:#889}.body{flex:1;min-width:0}
.stats{display:flex;flex-wrap:wrap;gap:3px 5px;align-items:center}
.c{font-size:12px;padding:0 5px;border-radius:3px;background:#ffffffb0;border:1px solid #0000001f;
white-space:nowrap}
.c i{font-style:normal;color:var(--muted)}.id{font-weight:600;color:#334}
.ok{background:#1f8a3a;color:#fff;border-color:#1f8a3a}
.bad{background:#c62828;color:#fff;border-color:#c62828}
.chosen{background:#d6f5dc;border-color:#1f8a3a;color:#145a26}
.rejected{background:#fbdcdc;border-color:#c62828;color:#8a1c1c}a.c{text-decoration:none}
.adv{background:#e6ecff;border-color:#5470c6}.ans{background:#2456c9;color:#fff;border-color:#2456c9}
.more{color:var(--muted);font-size:12px}.step{max-height:12em;overflow:auto}.flash{animation:fl 1.4s}
@keyframes fl{0%,60%{box-shadow:0 0 0 4px #f5b400}}
"""

SCRIPT = """(function(){var q=function(s){return Array.prototype.slice.call(document.querySelectorAll(s));};
var pick=document.getElementById('pick');
function show(v){q('section.tree').forEach(function(s){s.hidden=(v!=='all'&&s.id!==v);});}
if(pick){pick.addEventListener('change',function(){show(pick.value);});show(pick.value);}
function setOpen(f){q('section.tree:not([hidden]) details.n').forEach(function(d){d.open=f(+d.dataset.depth);
});}var OPEN=+document.body.dataset.openDepth;
document.getElementById('expand').onclick=function(){setOpen(function(){return true;});};
document.getElementById('collapse').onclick=function(){setOpen(function(d){return d<1;});};
document.getElementById('reset').onclick=function(){setOpen(function(d){return d<OPEN;});};
function reveal(id){var el=document.getElementById(id);if(!el)return;
var sec=el.closest('section.tree');if(pick&&sec.hidden){pick.value=sec.id;show(sec.id);}
for(var p=el.parentElement;p;p=p.parentElement){if(p.tagName==='DETAILS')p.open=true;}
var card=el.querySelector('.card');el.scrollIntoView({block:'center'});card.classList.add('flash');
setTimeout(function(){card.classList.remove('flash');},1500);}
document.addEventListener('click',function(e){var a=e.target.closest('a.goto');
if(a){e.preventDefault();reveal(a.getAttribute('href').slice(1));}});
if(location.hash)reveal(location.hash.slice(1));})();"""


@dataclass
class NodeMarks:
    """What the signals say about one node."""

    chosen: list[tuple[int, str]] = field(default_factory=list)  # (rejected sibling, tooltip) per pair
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (chosen sibling, tooltip) per pair
    advantages: dict[str, list[float]] = field(default_factory=dict)  # method → one value per record
    traces: int = 0  # SFT trace records ending here


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    x = float(x)
    if x == 0 or abs(x) >= 0.01 or not math.isfinite(x):
        return f"{x:.2f}" if abs(x) < 1000 else f"{x:.3g}"
    return f"{x:.1e}"


def _verdict(reward: float | None) -> str:
    return "" if reward is None else ("✓" if reward >= CORRECT else "✗")


def _step_advantages(tree: Tree, rec: dict) -> dict[int, float]:
    """Per-step advantage of an advantage record: the first trained token of each step on its path (the
    record's node gets the mean trained advantage when the token counts do not match the tree's steps)."""
    node, adv = rec["node"], rec["advantages"]
    mask = rec.get("loss_mask") or [1] * len(adv)
    path = tree.path(node)[1:]
    lens = [len(tree.nodes[i].step.token_ids) for i in path]  # type: ignore[union-attr]
    if sum(lens) != len(adv) or len(mask) != len(adv):
        trained = [a for a, m in zip(adv, mask) if m]
        return {node: sum(trained) / len(trained)} if trained else {}
    out, pos = {}, 0
    for i, n in zip(path, lens):
        if n and mask[pos]:
            out[i] = float(adv[pos])
        pos += n
    return out


def node_marks(tree: Tree, signals: Sequence[dict]) -> dict[int, NodeMarks]:
    """Marks of the tree's nodes from the signal records whose ``key`` is the tree's (others are ignored)."""
    marks: dict[int, NodeMarks] = {}
    size = len(tree.nodes)
    for rec in signals:
        node = rec.get("node")
        if rec.get("key") != tree.key or not isinstance(node, int) or not 0 <= node < size:
            continue
        if "chosen_node" in rec and "rejected_node" in rec:
            c, r = rec["chosen_node"], rec["rejected_node"]
            if not (isinstance(c, int) and isinstance(r, int) and 0 <= c < size and 0 <= r < size):
                continue
            q_c, q_r, w = (_fmt(rec.get(k)) for k in ("q_chosen", "q_rejected", "weight"))
            tip = f"Q {q_c} (chosen) vs {q_r} (rejected), weight {w}"
            marks.setdefault(c, NodeMarks()).chosen.append((r, tip))
            marks.setdefault(r, NodeMarks()).rejected.append((c, tip))
        elif isinstance(rec.get("advantages"), list):
            method = str(rec.get("method", "adv"))
            for i, a in _step_advantages(tree, rec).items():
                marks.setdefault(i, NodeMarks()).advantages.setdefault(method, []).append(a)
        elif "completion" in rec:
            marks.setdefault(node, NodeMarks()).traces += 1
    return marks


def _colours(tree: Tree, i: int) -> str:
    if i == ROOT:
        return "--bg:#eef1f6;--bd:#7d8799"
    if tree.nodes[i].visits == 0:
        return "--bg:#f2f2f2;--bd:#a9a9a9"
    hue = 120.0 * min(max(tree.q(i), 0.0), 1.0)
    return f"--bg:hsl({hue:.0f},70%,88%);--bd:hsl({hue:.0f},55%,42%)"


def _chip(label: str, value: str, title: str = "", cls: str = "c") -> str:
    t = f' title="{escape(title)}"' if title else ""
    lab = f"<i>{escape(label)}</i> " if label else ""
    return f'<span class="{cls}"{t}>{lab}{escape(value)}</span>'


def _outcome_chip(tree: Tree, i: int) -> str:
    n = tree.nodes[i]
    if not n.terminal:
        return ""
    if n.reward is None:
        return _chip("", "terminal, ungraded", "terminal node without a verifier reward (graded 0)")
    cls = "c ok" if n.reward >= CORRECT else "c bad"
    return _chip("", f"{_verdict(n.reward)} r {_fmt(n.reward)}", "verifier reward", cls)


def _stat_chips(tree: Tree, i: int) -> list[str]:
    n = tree.nodes[i]
    q_tip = "max backed-up value" if tree.backup == "max" else "value_sum / visits"
    out = [f'<span class="id">{"root (prompt)" if i == ROOT else f"#{i}"}</span>']
    out.append(_chip("N", str(n.visits), f"visits ({n.evaluations} own evaluations)"))
    out.append(_chip("Q", _fmt(tree.q(i)) if n.visits else "–", f"Q ({q_tip})"))
    if n.step is not None:
        tip = f"prior among siblings; step exp(mean logprob) {_fmt(n.step.prior)}"
        out.append(_chip("P", _fmt(n.prior), tip))
    if n.value is not None:
        out.append(_chip("v", _fmt(n.value), "last leaf evaluation of this node"))
    for k, v in sorted(n.extra.items()):
        if isinstance(v, bool):
            out.append(_chip("", k, f"extra[{k!r}] = {v}") if v else "")
        elif isinstance(v, (int, float)):
            out.append(_chip(EXTRA_LABELS.get(k, k), _fmt(v), f"extra[{k!r}]"))
        else:
            out.append(_chip(k, "…", json.dumps(v, ensure_ascii=False)[:500]))
    if n.rollout_rewards:
        rr = n.rollout_rewards
        out.append(_chip("rollouts", f"{len(rr)}, mean {_fmt(sum(rr) / len(rr))}", "rollout outcome rewards"))
    out.append(_outcome_chip(tree, i))
    if n.step is not None and n.step.truncated:
        out.append(_chip("", "✂ truncated", "cut at max_step_tokens"))
    if not n.terminal and not n.children and i != ROOT:
        out.append(_chip("", "unexpanded", "open leaf"))
    return [c for c in out if c]


def _mark_chips(ti: int, m: NodeMarks | None) -> list[str]:
    if m is None:
        return []
    link = '<a class="c {} goto" href="#t{}-n{}" title="{}">{} vs #{}</a>'
    out = [link.format("chosen", ti, r, escape(tip), "▲ chosen", r) for r, tip in m.chosen]
    out += [link.format("rejected", ti, c, escape(tip), "▼ rejected", c) for c, tip in m.rejected]
    for method, vals in sorted(m.advantages.items()):
        label = f"A[{method}]" if len(m.advantages) > 1 else "A"
        mean = sum(vals) / len(vals)
        text = f"{mean:+.2f}" if max(vals) - min(vals) < 1e-9 else f"mean {mean:+.2f} of {len(vals)} paths"
        out.append(_chip(label, text, f"{method} advantage of this step", "c adv"))
    if m.traces:
        out.append(_chip("", "SFT trace" + (f" ×{m.traces}" if m.traces > 1 else ""), "sft_traces", "c adv"))
    return out


def _subtree_sizes(tree: Tree) -> list[int]:
    size = [1] * len(tree.nodes)
    for i in range(len(tree.nodes) - 1, 0, -1):
        p = tree.nodes[i].parent
        if 0 <= p < i:
            size[p] += size[i]
    return size


@dataclass
class _Ctx:
    ti: int
    tree: Tree
    marks: dict[int, NodeMarks]
    answer_path: set[int]
    answer_node: int | None
    sizes: list[int]


def _card(ctx: _Ctx, i: int, kids: int) -> str:
    n = ctx.tree.nodes[i]
    chips = _stat_chips(ctx.tree, i) + _mark_chips(ctx.ti, ctx.marks.get(i))
    if i == ctx.answer_node:
        chips.append(_chip("", "★ chosen answer", "the node the search returned", "c ans"))
    if kids:
        below = ctx.sizes[i] - 1
        noun, nodes = ("child" if kids == 1 else "children"), ("node" if below == 1 else "nodes")
        chips.append(f'<span class="more">{kids} {noun} · {below} {nodes} below</span>')
    text = "" if n.step is None else f'<pre class="step">{escape(n.step.text)}</pre>'
    cls = "card" + (" unvisited" if n.visits == 0 else "") + (" path" if i in ctx.answer_path else "")
    return (
        f'<div class="{cls}" style="{_colours(ctx.tree, i)}"><span class="tog"></span>'
        f'<div class="body"><div class="stats">{"".join(chips)}</div>{text}</div></div>'
    )


def _render_nodes(ctx: _Ctx) -> str:
    """The tree as nested lists, built iteratively (deep trees cannot hit the recursion limit)."""
    nodes, out, seen = ctx.tree.nodes, ['<ul class="top">'], {ROOT}
    stack: list[tuple[bool, int]] = [(True, ROOT)]
    while stack:
        is_open, i = stack.pop()
        if not is_open:
            out.append("</ul></details></li>")
            continue
        kids = [c for c in nodes[i].children if 0 <= c < len(nodes) and c not in seen]
        seen.update(kids)
        nid = f"t{ctx.ti}-n{i}"
        if not kids:
            out.append(f'<li class="n leaf" id="{nid}">{_card(ctx, i, 0)}</li>')
            continue
        depth = nodes[i].depth
        opened = " open" if depth < OPEN_DEPTH else ""
        out.append(
            f'<li class="n" id="{nid}"><details class="n" data-depth="{depth}"{opened}>'
            f'<summary>{_card(ctx, i, len(kids))}</summary><ul class="kids">'
        )
        stack.append((False, i))
        stack.extend((True, c) for c in reversed(kids))
    out.append("</ul>")
    return "".join(out)


def _header(ti: int, tree: Tree, result: dict | None) -> str:
    leaves = tree.terminal_leaves()
    correct = sum(1 for i in leaves if (tree.nodes[i].reward or 0.0) >= CORRECT)
    r = result or {}
    node = r.get("node")
    link = f' <a class="goto" href="#t{ti}-n{node}">#{node}</a>' if isinstance(node, int) else ""
    facts = [  # (label, value, value is already HTML)
        ("simulations", r.get("num_simulations"), False),
        ("nodes", len(tree.nodes), False),
        ("max depth", max(n.depth for n in tree.nodes), False),
        ("terminal ✓/all", f"{correct}/{len(leaves)}", False),
        ("root visits", tree.nodes[ROOT].visits, False),
        ("backup", tree.backup, False),
        ("gold", tree.meta.get("answer"), False),
        ("answer", f"{escape(str(r.get('answer')))} {_verdict(r.get('reward'))}{link}" if r else None, True),
        ("method", f"{r.get('method', '–')} ({r.get('stop_reason', '')})" if r else None, False),
        ("generated tokens", (r.get("budget") or {}).get("generated_tokens"), False),
    ]
    spans = [
        f"<span>{escape(label)} <b>{v if is_html else escape(str(v))}</b></span>"
        for label, v, is_html in facts
        if v is not None
    ]
    opened = " open" if len(tree.prompt) <= 600 else ""
    return (
        f'<h2>Tree key={escape(str(tree.key))}</h2><div class="facts">{"".join(spans)}</div>'
        f'<details class="prompt"{opened}><summary>Prompt ({len(tree.prompt)} chars)</summary>'
        f"<pre>{escape(tree.prompt)}</pre></details>"
    )


def _answer_path(tree: Tree, result: dict | None) -> tuple[int | None, set[int]]:
    node = (result or {}).get("node")
    if not isinstance(node, int) or not 0 <= node < len(tree.nodes):
        return None, set()
    path, i = {node}, node
    while tree.nodes[i].parent != NO_PARENT and tree.nodes[i].parent not in path:
        i = tree.nodes[i].parent
        path.add(i)
    return node, path


def _top_bar(title: str, trees: Sequence[Tree], results: Sequence[dict | None]) -> str:
    parts = [f"<h1>{escape(title)}</h1>"]
    if len(trees) > 1:
        opts = ['<option value="all">all trees</option>']
        for ti, (t, r) in enumerate(zip(trees, results)):
            ans = f" · answer {r.get('answer')} {_verdict(r.get('reward'))}".rstrip() if r else ""
            sel = " selected" if ti == 0 else ""
            label = escape(f"key={t.key} · {len(t.nodes)} nodes{ans}")
            opts.append(f'<option value="tree-{ti}"{sel}>{label}</option>')
        parts.append(f'<label>tree <select id="pick">{"".join(opts)}</select></label>')
    parts.append(
        '<button id="expand">expand all</button><button id="collapse">collapse all</button>'
        f'<button id="reset">depth &lt; {OPEN_DEPTH}</button>'
        '<span class="legend">Q 0 <span class="scale"></span> 1 · grey: unvisited · blue ring: answer path · '
        "N visits · P prior · v value · PRM value_fn · A advantage</span>"
    )
    return f'<div class="bar">{"".join(parts)}</div>'


def render_html(
    trees: list[Tree],
    results: list[dict | None] | None = None,
    signals: list[dict] | None = None,
    title: str = "thinktree trees",
) -> str:
    """One self-contained HTML page showing ``trees`` (``results[i]``: the store's result summary of tree ``i``;
    ``signals``: pair / advantage / trace records, matched to trees by ``key``)."""
    res: list[dict | None] = list(results) if results is not None else [None] * len(trees)
    if len(res) != len(trees):
        raise ValueError(f"render_html: {len(trees)} trees but {len(res)} results")
    by_key: dict[object, list[dict]] = {}
    for rec in signals or []:
        by_key.setdefault(rec.get("key"), []).append(rec)
    sections = []
    for ti, (tree, result) in enumerate(zip(trees, res)):
        answer, path = _answer_path(tree, result)
        marks = node_marks(tree, by_key.get(tree.key, []))
        ctx = _Ctx(ti, tree, marks, path, answer, _subtree_sizes(tree))
        body = _header(ti, tree, result) + _render_nodes(ctx)
        sections.append(f'<section class="tree" id="tree-{ti}">{body}</section>')
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f'<body data-open-depth="{OPEN_DEPTH}">{_top_bar(title, trees, res)}'
        f"<main>{''.join(sections) or '<p>No trees.</p>'}</main><script>{SCRIPT}</script></body></html>\n"
    )


def _notice(message: str) -> None:
    print(f"thinktree view: notice: {message}", file=sys.stderr)


def load_jsonl(path: str | Path) -> list[dict]:
    """The records (JSON objects) of a JSONL file, e.g. signals. Refused with one ``ValueError`` naming the file
    and line: a directory, an unreadable file, a malformed line before the last. A truncated LAST line (no newline
    after it: a write in progress or a killed one) is skipped with a notice on stderr, as is an empty file."""
    return [record for _, record in _numbered_records(path)]


def _numbered_records(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.jsonl"))
        hint = f" (JSONL files in it: {', '.join(inside)})" if inside else ""
        raise ValueError(f"{path} is a directory; pass a JSONL file{hint}")
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    out = []
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:
            if n == len(lines) - 1:  # no newline after it: cut off mid-write
                _notice(f"{path}: line {n + 1} is incomplete ({len(raw)} bytes, no newline): skipped")
                continue
            raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: line {n + 1} is a JSON {type(record).__name__}, not a record (an object)"
            )
        out.append((n + 1, record))
    if not out:
        _notice(
            f"{path} holds no records ({'an empty file' if not data.strip() else 'only an incomplete line'})"
        )
    return out


def load_trees(path: str | Path) -> tuple[list[Tree], list[dict | None]]:
    """Trees and result summaries of a ``TreeStore`` file (or of bare ``Tree.to_dict`` lines), read-only.

    A line that is JSON but not a tree is refused with one ``ValueError`` naming the file and line."""
    trees, results = [], []
    for n, r in _numbered_records(path):
        try:
            trees.append(Tree.from_dict(r["tree"] if "tree" in r else r))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(
                f"{path}: line {n} is not a search tree ({type(e).__name__}: {e}); "
                "expected a TreeStore line ({key, tree, result}) or a Tree.to_dict record"
            ) from None
        results.append(r.get("result") if "tree" in r else None)
    return trees, results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinktree view", description="Write an HTML view of search trees.")
    p.add_argument("trees", help="trees JSONL (a TreeStore file)")
    p.add_argument("--out", "-o", default=None, help="HTML file to write (default: TREES with suffix .html)")
    p.add_argument("--signals", default=None, help="signals JSONL (step pairs, advantages, SFT traces)")
    p.add_argument("--title", default=None, help="page title (default: the trees file name)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--tree", type=int, default=None, metavar="KEY", help="only the tree(s) with this key")
    pick.add_argument("--max-trees", type=int, default=100, metavar="N", help="first N trees (100; 0 = all)")
    return p


def view_main(argv: list[str]) -> int:
    """``thinktree view`` (see module doc): write the HTML, print its path; 1 if no tree is selected."""
    args = _parser().parse_args(argv)
    trees, results = load_trees(args.trees)
    total = len(trees)
    if args.tree is not None:
        keep = [i for i, t in enumerate(trees) if t.key == args.tree]
        if not keep:
            print(f"thinktree view: no tree with key {args.tree} in {args.trees}", file=sys.stderr)
            return 1
    else:
        keep = list(range(total if args.max_trees <= 0 else min(total, args.max_trees)))
    signals = load_jsonl(args.signals) if args.signals else None
    out = Path(args.out) if args.out else Path(args.trees).with_suffix(".html")
    title = args.title or Path(args.trees).name
    page = render_html([trees[i] for i in keep], [results[i] for i in keep], signals, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    if len(keep) < total:
        print(f"thinktree view: showing {len(keep)} of {total} trees (--max-trees / --tree)")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(view_main(sys.argv[1:]))
