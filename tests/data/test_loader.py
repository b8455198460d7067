"""The loader over cached samples: exact resume per DP rank (with and without workers), DP sharding,
the token-budget rule, corrupt entries repaired or dropped by name, a crashing worker survived.

Every loop over loader steps runs under a deadline that names the worker processes still alive.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest
import torch
from data_files import write_image, write_json, write_wav
from test_cache import inputs, turn

from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.data import Loader, MemorySamples, StepSampler, open_cache, read_cache
from omnicore.data.loader import group_by_tokens

GLOBAL, MICRO, DP = 4, 2, 2


@pytest.fixture(scope="module")
def cached(tmp_path_factory, model_dir):
    """Ten samples (text, images of three sizes, two clips) in a cache; (cache folder, conversations, context)."""
    root = tmp_path_factory.mktemp("loader_data")
    for k in range(3):
        write_image(root / f"img{k}.png", 56, 56 + 28 * k, seed=k)
    write_wav(root / "a.wav", 0.8, seed=1)
    write_wav(root / "b.wav", 1.6, seed=2)
    records = [{"messages": turn("<image>" + "What is this? " * (k + 1), "A cat."), "images": [f"img{k % 3}.png"]} for k in range(4)]
    records += [{"messages": turn("<audio>Transcribe.", "Hello there."), "audios": [f"{n}.wav"]} for n in "ab"]
    records += [{"messages": turn("Count: " + "one " * (3 * k + 1), "Done.")} for k in range(4)]
    write_json(root / "data.json", records)
    convs, ctx = inputs(root, model_dir)
    cache = open_cache(root / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    assert len(cache) == 10
    return root / "cache" / cache.key, convs, ctx


def bounded(fn, what: str, seconds: float = 120):
    """fn() within `seconds`, else fail naming the worker processes still alive."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        alive = ", ".join(f"{p.name} (pid {p.pid})" for p in multiprocessing.active_children()) or "none"
        pytest.fail(f"{what} did not finish in {seconds:.0f} s; live worker processes: {alive}")
    return box[0]


def take(loader: Loader, consumed: int, n: int):
    def run():
        steps = loader.steps(consumed)
        try:
            return [next(steps) for _ in range(n)]
        finally:
            steps.close()

    return bounded(run, f"loader (rank {loader.dp_rank}, {loader.num_workers} workers) from position {consumed}")


def sampler(n: int) -> StepSampler:
    return StepSampler(n_samples=n, global_batch=GLOBAL, micro_batch=MICRO, dp_size=DP, seed=7)


def assert_same_steps(a, b) -> None:
    assert [s.consumed for s in a] == [s.consumed for s in b]
    for x, y in zip(a, b):
        assert len(x.micro_batches) == len(y.micro_batches)
        for p, q in zip(x.micro_batches, y.micro_batches):
            assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p), sorted(p)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("budget", [None, 90], ids=["count", "token budget"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_batches_of_the_uninterrupted_run(cached, workers, budget):
    folder, _, _ = cached
    cache = read_cache(folder)
    for rank in range(DP):
        loader = Loader(cache, sampler(len(cache)), dp_rank=rank, num_workers=workers, max_tokens=budget)
        straight = take(loader, 0, 7)  # 28 samples: crosses two epoch boundaries
        resumed = take(loader, 3 * GLOBAL, 4)
        assert resumed[0].consumed == 3 * GLOBAL
        assert_same_steps(resumed, straight[3:])
        in_process = take(Loader(cache, sampler(len(cache)), dp_rank=rank, max_tokens=budget), 0, 7)
        assert_same_steps(straight, in_process)  # workers change nothing
        # The batches hold the samples the plan names, in order.
        ids = [torch.cat([cache.load(i)["input_ids"] for i in mb]) for mb in loader.plan(0)]
        assert [b["input_ids"][0].tolist() for b in straight[0].micro_batches] == [t.tolist() for t in ids]


def test_ranks_split_each_global_batch(cached):
    cache = read_cache(cached[0])
    order = sampler(len(cache))
    for consumed in range(0, 6 * GLOBAL, GLOBAL):
        shares = [[i for mb in Loader(cache, order, dp_rank=r).plan(consumed) for i in mb] for r in range(DP)]
        # Rank r takes the r-th slice of the global batch (which may hold a sample twice across an epoch end).
        assert shares[0] + shares[1] == order.global_indices(consumed)
        assert len(shares[0]) == len(shares[1]) == GLOBAL // DP


def test_the_token_budget_rule():
    lengths = [5, 3, 4, 9, 2, 2]
    assert group_by_tokens(range(6), lengths, 8) == [[0, 1], [2], [3], [4, 5]]  # 9 > 8 goes alone
    assert group_by_tokens(range(6), lengths, 10, padded=True) == [[0, 1], [2], [3], [4, 5]]  # 3 x 5 > 10
    assert group_by_tokens(range(6), lengths, 100) == [[0, 1, 2, 3, 4, 5]]
    assert group_by_tokens([7, 3], [20, 1], 10) == [[7], [3]]


def test_a_token_budget_bounds_every_micro_batch(cached):
    cache = read_cache(cached[0])
    budget = 90
    steps = take(Loader(cache, sampler(len(cache)), dp_rank=1, max_tokens=budget), 0, 6)
    sizes = [int(b["cu_seqlens"][-1]) for s in steps for b in s.micro_batches]
    singles = [len(b["cu_seqlens"]) == 2 for s in steps for b in s.micro_batches]
    assert all(n <= budget or single for n, single in zip(sizes, singles))
    assert all(sum(len(b["cu_seqlens"]) - 1 for b in s.micro_batches) == GLOBAL // DP for s in steps)
    assert len(sizes) > 6 * GLOBAL // (DP * MICRO)  # the budget, not the count of 2, decided


def corrupt(folder, cache, index: int) -> None:
    shard = folder / cache.entries[index].shard
    info = SafetensorsFile(shard).tensors[f"{index}/input_ids"]
    with open(shard, "r+b") as f:
        f.seek(info.begin)
        f.write(b"\x7f")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_entry_is_repaired_or_dropped_by_name(cached, tmp_path, workers):
    folder, convs, ctx = cached
    copy = tmp_path / folder.name
    copy.mkdir()
    for f in folder.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    reference = read_cache(folder)
    expected = take(Loader(reference, sampler(10), dp_rank=0), 0, 3)
    victim = only_in_step_1(Loader(reference, sampler(10), dp_rank=0))
    corrupt(copy, reference, victim)

    repaired = read_cache(copy).attach(convs, ctx)  # knows the records: the entry is processed again
    loader = Loader(repaired, sampler(10), dp_rank=0, num_workers=workers)
    got = take(loader, 0, 3)
    assert_same_steps(got, expected)
    assert loader.stats.counts["repaired: corrupt cache entry"] == 1
    assert f"cache entry {victim} (id" in got[1].problems[0] and "checksum mismatch" in got[1].problems[0]

    bare = read_cache(copy)  # no records: the entry is dropped, the step goes on without it
    loader = Loader(bare, sampler(10), dp_rank=0, num_workers=workers)
    got = take(loader, 0, 3)
    assert loader.stats.counts["dropped: corrupt cache entry"] == 1 and f"cache entry {victim}" in got[1].problems[0]
    kept = [int(b["cu_seqlens"].numel() - 1) for b in got[1].micro_batches]
    assert sum(kept) == GLOBAL // DP - 1
    assert_same_steps([got[0], got[2]], [expected[0], expected[2]])


class Crashing:
    """A sample source whose `victim` kills the process loading it, unless that is the test process."""

    def __init__(self, samples: MemorySamples, victim: int, parent: int):
        self.samples, self.victim, self.parent = samples, victim, parent

    def __len__(self) -> int:
        return len(self.samples)

    def tokens(self, i: int) -> int:
        return self.samples.tokens(i)

    def describe(self, i: int) -> str:
        return self.samples.describe(i)

    def load(self, i: int):
        if i == self.victim and os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.samples.load(i)


def only_in_step_1(loader: Loader) -> int:
    """A sample of the rank's second step that its first and third steps do not hold."""
    others = {i for consumed in (0, 2 * GLOBAL) for mb in loader.plan(consumed) for i in mb}
    return next(i for mb in loader.plan(GLOBAL) for i in mb if i not in others)


@pytest.mark.timeout(300)
def test_a_worker_that_dies_on_a_sample_does_not_stop_the_run(cached):
    cache = read_cache(cached[0])
    samples = MemorySamples([cache.load(i) for i in range(len(cache))])
    expected = take(Loader(samples, sampler(10), dp_rank=1), 0, 3)
    victim = only_in_step_1(Loader(samples, sampler(10), dp_rank=1))
    loader = Loader(Crashing(samples, victim, os.getpid()), sampler(10), dp_rank=1, num_workers=2)
    got = take(loader, 0, 3)
    assert loader.stats.counts["dropped: worker crashed"] == 1
    assert got[1].problems == (f"sample {victim}: its worker process died loading it",)
    assert sum(int(b["cu_seqlens"].numel() - 1) for b in got[1].micro_batches) == GLOBAL // DP - 1
    assert_same_steps([got[0], got[2]], [expected[0], expected[2]])  # the steps around it are untouched
