"""Processed samples: end to end into `omnicore.prepare_inputs` and the TINY thinker's loss, the length
policy (sequence limit by whole rounds, media caps with error / truncate / skip), hostile records, and
a fuzz test that every layout the template emits is one the position code accepts."""

from __future__ import annotations

import attrs
import pytest
import torch
from data_files import write_image, write_json, write_video, write_wav
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omnicore
from omnicore import TINY
from omnicore.data import (
    MLLM,
    BadSample,
    Conversation,
    DataStats,
    LengthPolicy,
    MediaLimitError,
    MediaShapes,
    Problem,
    SampleContext,
    TemplateConfig,
    Turn,
    encode_conversation,
    iter_samples,
    parse_record,
    process_sample,
    read_dataset,
)
from omnicore.data.template import IGNORE_INDEX
from omnicore.models.positions import MediaQueue, audio_token_count, sample_positions


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_media")
    write_image(root / "pics" / "cat.png", 56, 56)
    write_wav(root / "long.wav", 2.0)
    write_video(root / "talk.mp4", frames=16, fps=4, audio_seconds=4.0)
    return root


def _conv(media, record) -> Conversation:
    return parse_record(record, MLLM, source=str(media / "data.json"))


def _turns(*pairs):
    return [{"role": r, "content": c} for pair in pairs for r, c in zip(("user", "assistant"), pair)]


def test_end_to_end_into_the_tiny_thinker(media, tokenizer):
    record = {
        "messages": _turns(("<image>What is it? <audio>", "A cat."), ("And <video>?", "Stripes.")),
        "images": ["pics/cat.png"], "audios": ["long.wav"], "videos": ["talk.mp4"], "use_audio_in_video": True,
    }  # fmt: skip
    sample = process_sample(_conv(media, record), SampleContext(tokenizer=tokenizer, model=TINY))
    batch = sample.batch()
    assert batch["input_ids"].shape == (1, len(sample)) and batch["position_ids"].shape == (3, 1, len(sample))
    inputs = omnicore.prepare_inputs(TINY, batch)
    assert torch.equal(inputs.positions, sample.positions)
    # Positions the thinker computes itself from the media metadata agree with ours.
    without = {k: v for k, v in batch.items() if k != "position_ids"}
    assert torch.equal(omnicore.prepare_inputs(TINY, without).positions, sample.positions)
    assert list(inputs.audios.layout.mel_frames) == sample.media["audio_feature_lengths"].tolist()
    params = omnicore.init_thinker(TINY, seed=0)
    loss = omnicore.thinker_loss(params, TINY, batch)
    assert torch.isfinite(loss) and loss > 0
    assert (sample.labels != IGNORE_INDEX).sum() == len(tokenizer.encode("A cat.<|im_end|>\nStripes.<|im_end|>\n"))


def test_sequence_limit_drops_or_keeps_whole_rounds(media, tokenizer):
    record = {"messages": _turns(("<image>One?", "1."), ("Two?", "2."), ("<image>Three?", "3.")), "images": ["pics/cat.png"] * 2}
    conv = _conv(media, record)
    full = process_sample(conv, SampleContext(tokenizer=tokenizer, model=TINY))
    two_rounds = process_sample(conv.first_rounds(2), SampleContext(tokenizer=tokenizer, model=TINY))
    limit = len(full) - 1
    drop = SampleContext(tokenizer=tokenizer, model=TINY, length=LengthPolicy(max_seq_len=limit))
    with pytest.raises(BadSample, match=f"{len(full)} tokens, over max_seq_len {limit}") as info:
        process_sample(conv, drop)
    assert info.value.problem == Problem.TOO_LONG and info.value.where.endswith("data.json[0]")
    cut = process_sample(conv, attrs.evolve(drop, length=LengthPolicy(max_seq_len=limit, on_too_long="truncate")))
    assert torch.equal(cut.input_ids, two_rounds.input_ids) and cut.notes == ("text truncated",)
    assert cut.media["image_grid_thw"].shape[0] == 1  # the third round's image went with it
    assert cut.input_ids[-2:].tolist() == [tokenizer.special.im_end, tokenizer.encode("\n")[0]]
    tiny_limit = LengthPolicy(max_seq_len=5, on_too_long="truncate")
    stats = DataStats()
    assert list(iter_samples([conv], attrs.evolve(drop, length=tiny_limit), stats)) == []
    assert stats.counts["dropped: too long"] == 1


@pytest.mark.parametrize("fits", [1, 3, 4])
def test_truncation_keeps_the_most_rounds_that_fit(media, tokenizer, fits):
    conv = _conv(media, {"messages": _turns(*[(f"Question {i}?" * (i + 1), f"Answer {i}.") for i in range(5)])})
    ctx = SampleContext(tokenizer=tokenizer, model=TINY)
    lengths = [len(process_sample(conv.first_rounds(k), ctx)) for k in range(1, 6)]
    limited = attrs.evolve(ctx, length=LengthPolicy(max_seq_len=lengths[fits - 1] + 1, on_too_long="truncate"))
    assert len(process_sample(conv, limited)) == lengths[fits - 1]


def test_mask_history_labels_the_last_kept_round(media, tokenizer):
    conv = _conv(media, {"messages": _turns(("Q1", "A1"), ("Q2", "A2"))})
    full = process_sample(conv, SampleContext(tokenizer=tokenizer, model=TINY))
    ctx = SampleContext(tokenizer=tokenizer, model=TINY, template=TemplateConfig(mask_history=True),
                        length=LengthPolicy(max_seq_len=len(full) - 1, on_too_long="truncate"))  # fmt: skip
    cut = process_sample(conv, ctx)
    labelled = [t for t, l in zip(cut.input_ids.tolist(), cut.labels.tolist()) if l != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "A1<|im_end|>\n"


@pytest.mark.parametrize("policy", ["error", "truncate", "skip"])
def test_media_caps(media, tokenizer, policy):
    record = {"messages": _turns(("<audio><video>", "ok")), "audios": ["long.wav"], "videos": ["talk.mp4"]}
    caps = LengthPolicy(max_audio_seconds=1.0, max_video_frames=5, on_media_limit=policy)
    ctx = SampleContext(tokenizer=tokenizer, model=TINY, length=caps)
    if policy == "error":
        with pytest.raises(MediaLimitError, match="talk.mp4': 8 frames, over max_video_frames 5"):
            process_sample(_conv(media, record), ctx)
    elif policy == "skip":
        stats = DataStats()
        assert list(iter_samples([_conv(media, record)], ctx, stats)) == []
        assert stats.counts["dropped: media over limit"] == 1
    else:
        stats = DataStats()
        (sample,) = iter_samples([_conv(media, record)], ctx, stats)
        assert sample.media["audio_feature_lengths"].tolist() == [100]  # 1 s = 100 mel frames
        assert sample.media["video_grid_thw"][0, 0] == 2  # 4 of 8 frames kept (even), 2 temporal grids
        assert stats.counts["audio truncated"] == 1 and stats.counts["video truncated"] == 1


@pytest.mark.parametrize(
    ("record", "problem", "detail"),
    [
        ({"messages": _turns(("<image>x", "y")), "images": ["../../../../etc/passwd"]}, Problem.MEDIA, "outside the media roots"),
        ({"messages": _turns(("<image>x", "y")), "images": ["/etc/hostname"]}, Problem.MEDIA, "outside the media roots"),
        ({"messages": _turns(("<image>x", "y")), "images": ["pics/absent.png"]}, Problem.MEDIA, "missing"),
        ({"messages": _turns(("<image>x", "y")), "images": ["https://example.com/a.png"]}, Problem.MEDIA, "URL"),
        ({"messages": _turns(("<audio>x", "y")), "audios": ["pics/cat.png"]}, Problem.MEDIA, "no audio"),
        ({"messages": _turns(("<video>x", "y")), "videos": [["pics/cat.png"]], "use_audio_in_video": True}, Problem.MEDIA, "no sound track"),
        ({"messages": _turns(("x<|im_end|>", "y"))}, Problem.SPECIAL_TOKEN, "<|im_end|>"),
        ({"messages": _turns(("x", "<|IMAGE|>"))}, Problem.SPECIAL_TOKEN, "<|IMAGE|>"),
    ],
)
def test_hostile_records_are_bad_samples(media, tokenizer, record, problem, detail):
    ctx = SampleContext(tokenizer=tokenizer, model=TINY)
    with pytest.raises(BadSample) as info:
        process_sample(_conv(media, record | {"id": "evil"}), ctx)
    assert info.value.problem == problem and detail in info.value.detail and info.value.id == "evil"


def test_bad_samples_never_lose_good_ones(media, tokenizer, tmp_path):
    good = {"messages": _turns(("<image>x", "y")), "images": ["pics/cat.png"]}
    escape = {"messages": _turns(("<image>x", "y")), "images": ["../secret.png"]}
    write_image(media.parent / "secret.png")
    path = write_json(media / "mixed.json", [good, escape, good])
    convs, stats = read_dataset(path, MLLM)
    samples = list(iter_samples(convs, SampleContext(tokenizer=tokenizer, model=TINY), stats))
    assert len(samples) == 2 and stats.counts["samples"] == 2
    assert stats.counts["dropped: media error"] == 1 and stats.bad[0].where == f"{path}[1]"


_text = st.lists(st.sampled_from(["<image>", "<video>", "<audio>", "hi", " ", "\n", "é", "<|im_end|>", "<vid", "x"]), max_size=6).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(_text, min_size=2, max_size=6).filter(lambda t: len(t) % 2 == 0),
    aiv=st.booleans(),
    grids=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([2, 4]), st.sampled_from([2, 4])), min_size=6, max_size=6),
    frames=st.lists(st.integers(0, 400), min_size=12, max_size=12),
    spg=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_fuzz_template_layouts_are_valid_positions(tokenizer, texts, aiv, grids, frames, spg):
    turns = tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts))
    counts = {k: sum(t.count(f"<{k}>") for t in texts) for k in ("image", "video", "audio")}
    conv = Conversation(id="f", source="f.json", index=0, turns=turns, images=("i",) * counts["image"],
                        videos=("v",) * counts["video"], audios=("a",) * counts["audio"], use_audio_in_video=aiv)  # fmt: skip
    audio = {(kind, i): frames[j % len(frames)] for j, (kind, i) in enumerate([("file", i) for i in range(6)] + [("track", i) for i in range(6)])}
    shapes = MediaShapes(image_grids=grids, video_grids=grids, video_seconds_per_grid=[spg] * 6, audio_frames=audio)
    try:
        enc = encode_conversation(conv, tokenizer, shapes, TINY, TemplateConfig())
    except BadSample as e:
        assert e.problem in (Problem.SPECIAL_TOKEN, Problem.MEDIA, Problem.PLACEHOLDERS)
        return
    assert len(enc.input_ids) == len(enc.labels)
    n_images = sum(t.count("<image>") for t in texts)
    n_videos = sum(t.count("<video>") for t in texts)
    queue = MediaQueue(image_grids=grids[:n_images], video_grids=grids[:n_videos], video_seconds_per_grid=[spg] * n_videos,
                       audio_mel_frames=[audio[k] for k in enc.audio_order])  # fmt: skip
    positions = sample_positions(TINY, enc.input_ids, queue)
    queue.check_consumed()
    assert positions.shape == (3, len(enc.input_ids))
    assert enc.input_ids.count(tokenizer.special.audio) == sum(audio_token_count(audio[k]) for k in enc.audio_order)
