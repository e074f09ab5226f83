"""The HTML tree viewer (thinktree.trainer.view): stats, escaping, self-containment, signal marks, CLI, browser."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from thinktree.search.store import TreeStore
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import StepRecord
from thinktree.trainer.signals import step_pairs
from thinktree.trainer.signals.advantages import treerl_advantages, treerl_step_advantages
from thinktree.trainer.view import SCRIPT, load_trees, node_marks, render_html, view_main

EVIL = "<script>alert(1)</script>"


def _step(text: str, eos: bool = False) -> StepRecord:
    n = len(text.split())
    return StepRecord(text, tuple(range(100, 100 + n)), tuple([-0.1] * n), prior=0.9, eos=eos)


def _set(tree: Tree, i: int, visits: int, value_sum: float, **kw: object) -> None:
    node = tree.nodes[i]
    node.visits, node.value_sum, node.evaluations = visits, value_sum, 1
    for k, v in kw.items():
        setattr(node, k, v)


def make_tree(key: int = 7) -> Tree:
    """A small hand-built search tree: a correct and a wrong answer under node 1, a deep wrong branch under
    node 2 (depth 4: collapsed by default) and an unvisited step whose text is a script tag."""
    t = Tree(prompt="Natalia sold 48 clips in April and half as many in May. How many in total?", key=key)
    t.meta = {"answer": "72"}
    a = t.add_child(ROOT, _step("In May she sold 48 / 2 = 24 clips."), 0.6, False)  # 1
    b = t.add_child(ROOT, _step("In May she sold 48 * 2 = 96 clips."), 0.3, False)  # 2
    t.add_child(ROOT, _step(EVIL + " hmm"), 0.1, False)  # 3: never visited
    t.add_child(a, _step("Altogether 48 + 24 = 72. The answer is 72.", eos=True), 0.7, True)  # 4
    t.add_child(a, _step("Altogether 48 + 24 = 62. The answer is 62.", eos=True), 0.3, True)  # 5
    c = t.add_child(b, _step("Altogether 48 + 96 = 144."), 1.0, False)  # 6
    d = t.add_child(c, _step("Let me double-check 144."), 1.0, False)  # 7 (depth 3)
    t.add_child(d, _step("The answer is 144.", eos=True), 1.0, True)  # 8 (depth 4)
    _set(t, ROOT, 10, 5.0)
    _set(t, 1, 6, 4.5, value=0.7)
    _set(t, 2, 3, 0.5, value=0.4)
    _set(t, 4, 4, 4.0, reward=1.0, value=1.0, extra={"value_fn": 0.93})
    _set(t, 5, 1, 0.0, reward=0.0, value=0.0, extra={"value_fn": 0.41})
    _set(t, 6, 2, 0.5, rollout_rewards=[1.0, 0.0])
    _set(t, 7, 1, 0.0)
    _set(t, 8, 1, 0.0, reward=0.0, value=0.0)
    return t


RESULT = {"key": 7, "node": 4, "answer": "72", "completion": "...", "method": "mcts/visits", "reward": 1.0,
          "num_simulations": 10, "stop_reason": "simulations", "budget": {"generated_tokens": 57}}  # fmt: skip


def test_node_stats_and_header() -> None:
    page = render_html([make_tree()], [RESULT])
    assert "<i>N</i> 6</span>" in page and "<i>Q</i> 0.75</span>" in page  # node 1: 4.5 / 6
    assert "<i>P</i> 0.60</span>" in page and "<i>PRM</i> 0.93</span>" in page
    assert "✓ r 1.00" in page and "✗ r 0.00" in page
    assert "<i>rollouts</i> 2, mean 0.50" in page and "unexpanded" in page
    assert 'id="t0-n8"' in page and "The answer is 144." in page
    assert "simulations <b>10</b>" in page and "answer <b>72 ✓" in page and "gold <b>72</b>" in page
    assert "★ chosen answer" in page and page.count("card path") == 3  # root, 1, 4
    assert "nodes <b>9</b>" in page and "Natalia sold 48 clips" in page
    assert 'id="pick"' not in page  # one tree: no selector


def test_max_backup_q() -> None:
    t = make_tree()
    t.backup = "max"
    t.nodes[2].max_value = 0.9
    assert "<i>Q</i> 0.90</span>" in render_html([t])


def test_model_text_is_escaped() -> None:
    t = make_tree()
    t.prompt = EVIL + ' & "quotes"'
    page = render_html([t], [dict(RESULT, answer=EVIL)], title=EVIL)
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; hmm" in page
    assert page.count("<script>") == 1  # only the viewer's own script


def test_self_contained() -> None:
    page = render_html([make_tree(), make_tree(8)], [RESULT, None])
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page  # the CSP lets exactly the viewer's script run


def test_collapse_below_depth_3() -> None:
    page = render_html([make_tree()])
    opened = re.findall(r'data-depth="(\d)"( open)?>', page)
    assert {(d, o) for d, o in opened} == {("0", " open"), ("1", " open"), ("2", " open"), ("3", "")}


def test_selector_for_several_trees() -> None:
    page = render_html([make_tree(7), make_tree(8)], [RESULT, None])
    assert 'id="pick"' in page and "key=7 · 9 nodes · answer 72 ✓" in page and "key=8 · 9 nodes<" in page
    assert 'id="tree-0"' in page and 'id="tree-1"' in page and 'href="#t1-n4"' not in page
    with pytest.raises(ValueError, match="2 trees but 1 results"):
        render_html([make_tree(7), make_tree(8)], [RESULT])


def test_pair_and_advantage_marks() -> None:
    t = make_tree()
    pairs = step_pairs([t])
    assert {(p["node"], p["chosen_node"], p["rejected_node"]) for p in pairs} == {(0, 1, 2), (1, 4, 5)}
    advs = treerl_advantages(t, dedupe_prefixes=True) + treerl_advantages(t)
    other_tree = [dict(p, key=99) for p in pairs]
    page = render_html([t], signals=pairs + advs + other_tree)
    assert "▲ chosen vs #2" in page and "▼ rejected vs #1" in page
    assert "▲ chosen vs #5" in page and "▼ rejected vs #4" in page
    expected = treerl_step_advantages(t)
    assert f"<i>A</i> {expected[1]:+.2f}</span>" in page and f"<i>A</i> {expected[5]:+.2f}</span>" in page
    assert "<i>A</i>" not in render_html([t]) and "chosen vs" not in render_html([t])
    marks = node_marks(t, advs)
    assert marks[4].advantages["treerl"] == [expected[4]] * 2  # dedupe record + path record agree
    assert 3 not in marks  # never visited, no evidence


def test_other_signal_records() -> None:
    t = make_tree()
    recs = [
        {"key": 7, "node": 4, "method": "grpo", "advantages": [0.5, 0.5, 0.25], "loss_mask": [1, 1, 1]},
        {"key": 7, "node": 4, "method": "treerpo", "advantages": [0.0] * 20, "loss_mask": [1] * 20},
        {"key": 7, "node": 8, "prompt": "p", "completion": "c", "q": 0.1, "reward": 0.0},  # an SFT trace
        {"key": 7, "node": 99, "chosen_node": 1, "rejected_node": 2},  # out of range: ignored
    ]
    marks = node_marks(t, recs)
    assert marks[4].advantages["grpo"] == [pytest.approx(0.4166666)]  # 3 tokens ≠ path tokens: mean
    assert set(marks[1].advantages) == {"treerpo"} and marks[8].traces == 1
    page = render_html([t], signals=recs)
    assert "<i>A[grpo]</i> +0.42" in page and "<i>A[treerpo]</i> +0.00" in page and "SFT trace" in page


def test_cli_writes_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_path = tmp_path / "trees.jsonl"
    store = TreeStore(store_path)
    for key in (7, 8, 9):
        store.append(make_tree(key))
    signals = tmp_path / "signals.jsonl"
    signals.write_text("".join(json.dumps(p) + "\n" for p in step_pairs(store.load())))
    assert view_main([str(store_path), "--signals", str(signals)]) == 0
    out = tmp_path / "trees.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert page.count('<section class="tree"') == 3 and "▲ chosen vs #2" in page

    html2 = tmp_path / "one" / "k8.html"
    assert view_main([str(store_path), "--tree", "8", "--out", str(html2)]) == 0
    assert html2.read_text().count('<section class="tree"') == 1 and "key=8" in html2.read_text()
    assert view_main([str(store_path), "--max-trees", "2", "-o", str(html2)]) == 0
    assert "showing 2 of 3 trees" in capsys.readouterr().out
    assert html2.read_text().count('<section class="tree"') == 2
    assert view_main([str(store_path), "--tree", "42", "-o", str(html2)]) == 1


def test_load_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    record = {"key": 7, "tree": make_tree().to_dict(), "result": RESULT}
    data = (json.dumps(record) + "\n" + json.dumps(make_tree(8).to_dict()) + "\n" + '{"key": 9, "tr').encode()
    path.write_bytes(data)  # a bare tree line and a partial last line (a search still writing)
    trees, results = load_trees(path)
    assert [t.key for t in trees] == [7, 8] and results == [RESULT, None]
    assert path.read_bytes() == data


@pytest.mark.slow
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("`chromium` is not on PATH (Debian: apt-get install -y chromium)")
    t = make_tree()
    page = render_html([t, make_tree(8)], [RESULT, None], signals=step_pairs([t]) + treerl_advantages(t))
    html_path, png = tmp_path / "trees.html", tmp_path / "trees.png"
    html_path.write_text(page, encoding="utf-8")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    url = html_path.as_uri()
    subprocess.run([chromium, *flags, f"--screenshot={png}", "--window-size=1200,900", url],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert png.stat().st_size > 5_000
    image = pytest.importorskip("PIL.Image")
    with image.open(png) as im:
        assert im.size == (1200, 900)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, chips and Q colours, not a blank page
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    assert re.search(r'<section class="tree" id="tree-1" hidden', dom)  # the script ran (CSP hash accepted)
    assert EVIL not in dom
    dom = subprocess.run([chromium, *flags, "--dump-dom", url + "#t1-n8"], check=True, capture_output=True,
                         text=True, timeout=120).stdout  # fmt: skip
    assert re.search(r'<section class="tree" id="tree-0" hidden', dom)  # a link to a node selects its tree
    assert re.search(r'<details class="n" data-depth="3" open', dom)  # ... and opens its collapsed ancestors
