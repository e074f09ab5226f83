"""TreeStore: exact JSONL round trips, crash safety (partial last line), resumable searches."""

import json

import numpy as np
import pytest

from thinktree.search import MCTSConfig, Trajectory, TreeStore, best_of_n, search, search_resumable
from thinktree.search.toy import RandomTreeWorld

CONFIG = MCTSConfig(num_simulations=6, num_children=3, max_depth=4, dirichlet_fraction=0.25)
WORLD = RandomTreeWorld(seed=11)


def prompts(n=5):
    return [Trajectory(f"prompt {i}", key=100 + i, meta={"answer": str(i)}) for i in range(n)]


def run(ps, seed=0):
    return search(ps, WORLD, WORLD.outcome_fn, config=CONFIG, rng=np.random.default_rng(seed))


def test_round_trip_byte_for_byte(tmp_path):
    results = run(prompts(3))
    store = TreeStore(tmp_path / "trees.jsonl")
    for r in results:
        store.append(r)
    store.append(results[0].tree)  # a bare tree
    loaded = TreeStore(tmp_path / "trees.jsonl").load()
    assert [t.to_json() for t in loaded] == [r.tree.to_json() for r in results] + [results[0].tree.to_json()]
    assert loaded[:3] == [r.tree for r in results]
    summaries = store.results()
    assert summaries[3] is None
    assert summaries[0]["answer"] == results[0].answer and summaries[0]["key"] == 100
    assert summaries[1]["budget"]["generated_tokens"] == results[1].budget.generated_tokens
    assert store.done_keys() == {100, 101, 102} and len(store) == 4
    lines = (tmp_path / "trees.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line)["tree"] for line in lines[:-1])


def test_partial_last_line_is_ignored_and_truncated(tmp_path):
    path = tmp_path / "trees.jsonl"
    results = run(prompts(2))
    store = TreeStore(path)
    store.append(results[0])
    full = path.read_bytes()
    with open(path, "ab") as f:  # a run killed in the middle of writing the second line
        f.write(full[: len(full) // 2])
    assert [t.to_json() for t in store.load()] == [results[0].tree.to_json()]  # ignored while reading
    assert store.done_keys() == {100}
    reopened = TreeStore(path)  # truncated on open
    assert path.read_bytes() == full
    reopened.append(results[1])
    assert [t.to_json() for t in reopened.load()] == [r.tree.to_json() for r in results]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "trees.jsonl"
    store = TreeStore(path)
    store.append(run(prompts(1))[0])
    with open(path, "ab") as f:
        f.write(b"{not json}\n")
    store.append(run(prompts(1))[0])
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        store.load()


def test_missing_file_is_empty(tmp_path):
    store = TreeStore(tmp_path / "sub" / "none.jsonl")
    assert store.load() == [] and store.done_keys() == set() and len(store) == 0


def test_resume_skips_done_keys_and_matches_uninterrupted_run(tmp_path):
    ps = prompts(5)
    reference = TreeStore(tmp_path / "ref.jsonl")
    search_resumable(
        reference, ps, search, WORLD, WORLD.outcome_fn, config=CONFIG, rng=np.random.default_rng(7)
    )

    store = TreeStore(tmp_path / "resumed.jsonl")
    first = search_resumable(
        store, ps[:2], search, WORLD, WORLD.outcome_fn, config=CONFIG, rng=np.random.default_rng(7)
    )  # "killed" after two prompts
    assert len(first) == 2
    calls = []

    def counting_search(chunk, *args, **kwargs):
        calls.append([p.key for p in chunk])
        return search(chunk, *args, **kwargs)

    rest = search_resumable(
        store,
        ps,
        counting_search,
        WORLD,
        WORLD.outcome_fn,
        config=CONFIG,
        rng=np.random.default_rng(7),
        chunk_size=2,
    )
    assert calls == [[102, 103], [104]]
    assert [r.tree.key for r in rest] == [102, 103, 104]
    assert [t.to_json() for t in store.load()] == [t.to_json() for t in reference.load()]
    again = search_resumable(
        store, ps, counting_search, WORLD, WORLD.outcome_fn, config=CONFIG, rng=np.random.default_rng(7)
    )
    assert again == [] and len(calls) == 2


def test_resume_works_for_baselines(tmp_path):
    store = TreeStore(tmp_path / "bon.jsonl")
    kwargs = dict(n=3, answer_fn=WORLD.answer_fn, max_depth=4)
    search_resumable(
        store, prompts(2), best_of_n, WORLD, WORLD.outcome_fn, rng=np.random.default_rng(1), **kwargs
    )
    search_resumable(
        store, prompts(4), best_of_n, WORLD, WORLD.outcome_fn, rng=np.random.default_rng(1), **kwargs
    )
    seed = int(np.random.default_rng(1).integers(0, 2**63))
    direct = best_of_n(prompts(4), WORLD, WORLD.outcome_fn, rng=np.random.default_rng(seed), **kwargs)
    assert [t.to_json() for t in store.load()] == [r.tree.to_json() for r in direct]


def test_append_rejects_other_types(tmp_path):
    with pytest.raises(TypeError, match="SearchResult or Tree"):
        TreeStore(tmp_path / "x.jsonl").append({"tree": 1})
