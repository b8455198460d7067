"""Exact data resume on realistic input: two datasets mixed by weight (`DatasetSpec.weight`: 1.5 and
2), about 1 % bad samples (a missing image, a corrupt audio file, a malformed record; plus one cache
entry corrupted on disk), shuffled epochs, DP 2, worker processes. A fresh cache reader and Loader
started at step K's position (samples consumed) yield exactly the next 50 steps of the uninterrupted
stream (torch.equal on every tensor, the same problems named), crossing an epoch boundary.

Dataset weights live in the Python data config (`DataConfig.datasets`); MindSpeed's data.json lists
dataset files without weights (docs/data_json.md).
"""

from __future__ import annotations

import pytest
from data_files import write_image, write_json, write_wav
from test_cache import turn
from test_loader import assert_same_steps, corrupt, take

from omnicore import TINY
from omnicore.data import MLLM, DataConfig, DatasetSpec, Loader, SampleContext, StepSampler, load_tokenizer, open_cache

GLOBAL, MICRO, DP, WORKERS, SEED = 8, 2, 2, 2, 11
K, NEXT = 10, 50  # resume after step K; compare the NEXT steps
PICTURES, TALK = 150, 60  # records per dataset


def _write_datasets(root):
    """pictures.json (weight 1.5): images of three sizes, one missing. talk.json (weight 2): text and
    audio, one clip corrupt, one record with a placeholder and no media (malformed)."""
    for k in range(3):
        write_image(root / "pictures" / f"img{k}.png", 56, 56 + 28 * k, seed=k)
    pictures = [{"messages": turn("<image>" + "Describe it. " * (1 + k % 5), "A cat " * (1 + k % 3)),
                 "images": ["missing.png" if k == 37 else f"img{k % 3}.png"]} for k in range(PICTURES)]  # fmt: skip
    write_json(root / "pictures" / "pictures.json", pictures)
    write_wav(root / "talk" / "a.wav", 0.6, seed=1)
    write_wav(root / "talk" / "b.wav", 1.1, seed=2)
    (root / "talk" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(64)))
    talk = []
    for k in range(TALK):
        if k % 2:
            talk.append({"messages": turn("Count: " + "one " * (1 + k % 7), "Done " * (1 + k % 4))})
        else:
            clip = "broken.wav" if k == 20 else "ab"[k % 4 // 2] + ".wav"
            talk.append({"messages": turn("<audio>Transcribe " + "this " * (k % 3), "Hello there."), "audios": [clip]})
    talk[45] = {"messages": turn("<image>No image given.", "Then nothing.")}  # placeholder without media: refused when read
    write_json(root / "talk" / "talk.json", talk)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, model_dir):
    """The weighted mix, cached: (opened(): the cache as a new process opens it, the number of cached samples,
    the entry corrupted on disk)."""
    root = tmp_path_factory.mktemp("mixed")
    _write_datasets(root)
    dcfg = DataConfig(datasets=[DatasetSpec(path=root / "pictures" / "pictures.json", weight=1.5),
                                DatasetSpec(path=root / "talk" / "talk.json", weight=2)], attr=MLLM, seed=SEED)  # fmt: skip
    convs = dcfg.read_conversations()
    ctx = SampleContext.for_data(dcfg, load_tokenizer(model_dir), TINY)

    def opened():
        return open_cache(root / "cache", convs.train, ctx, tokenizer_dir=model_dir, progress=False)

    cache = opened()
    assert cache.built
    bad_media = sum(1 for c in convs.train if {"missing.png", "broken.wav"} & {*c.images, *c.audios})
    assert convs.stats.counts["dropped: placeholder/media count mismatch"] == 1
    assert cache.stats.counts["dropped: media error"] == bad_media >= 3  # the clip's 2 copies, the image's 1 or 2 (hashed by path)
    assert len(cache) == len(convs.train) - bad_media
    assert 0.005 <= bad_media / len(convs.train) <= 0.015  # about 1 % of the weighted mix
    # One stored entry corrupted on disk, inside rank 0's resumed window: repaired from its record when loaded.
    order = StepSampler(n_samples=len(cache), global_batch=GLOBAL, micro_batch=MICRO, dp_size=DP, seed=SEED)
    victim = order.rank_micro_batches((K + 5) * GLOBAL, 0)[0][0]
    corrupt(cache.path, cache, victim)
    cache.close()
    return opened, len(convs.train) - bad_media, victim


def test_weights_mix_both_datasets(mixed, model_dir):
    opened, n, _ = mixed
    cache = opened()
    try:
        sources = [cache.describe(i) for i in range(len(cache))]
    finally:
        cache.close()
    pictures = sum("pictures.json" in s for s in sources)
    talk = sum("talk.json" in s for s in sources)
    assert pictures + talk == n
    assert pictures in (PICTURES * 3 // 2 - 1, PICTURES * 3 // 2 - 2)  # 1.5 copies, less the missing image's
    assert talk == 2 * (TALK - 1) - 2  # two copies of the valid records, less the corrupt clip's


@pytest.mark.timeout(300)
@pytest.mark.parametrize("budget", [None, 130], ids=["count", "token budget"])
def test_a_fresh_loader_resumed_at_step_k_yields_the_next_50_steps(mixed, budget):
    opened, n, victim = mixed
    order = StepSampler(n_samples=n, global_batch=GLOBAL, micro_batch=MICRO, dp_size=DP, seed=SEED)
    assert K * GLOBAL < n < (K + NEXT) * GLOBAL  # the resumed steps cross into the second epoch
    for rank in range(DP):
        cache = opened()
        try:
            straight = take(Loader(cache, order, dp_rank=rank, num_workers=WORKERS, max_tokens=budget), 0, K + NEXT)
        finally:
            cache.close()
        cache = opened()  # as a new process: the cache opened again, a new Loader at the saved position
        try:
            loader = Loader(cache, order, dp_rank=rank, num_workers=WORKERS, max_tokens=budget)
            resumed = take(loader, K * GLOBAL, NEXT)
        finally:
            cache.close()
        assert resumed[0].consumed == K * GLOBAL
        if budget:  # the budget, not the count of 2, cut the steps: 2 to 4 micro-batches (~62 tokens a sample)
            assert len({len(s.micro_batches) for s in resumed}) > 1
        assert_same_steps(resumed, straight[K:])
        assert [s.problems for s in resumed] == [s.problems for s in straight[K:]]
        if rank == 0:  # the corrupted entry was met (and repaired) in the resumed steps, in both streams
            assert any(f"cache entry {victim} (id" in p for s in resumed for p in s.problems)
            assert loader.stats.counts["repaired: corrupt cache entry"] >= 1
        assert sum(int(b["cu_seqlens"].numel() - 1) for s in resumed for b in s.micro_batches) == NEXT * GLOBAL // DP
