"""Chat template, placeholder expansion and positions against transformers 4.52.4.

The same tokenizer (tiny_tokenizer.py, loaded by transformers' Qwen2TokenizerFast and by omnicore) and the
same conversation go through `Qwen2_5OmniProcessor` (its chat template is the one of qwen2_5_omni.md 5.1,
written in tiny_tokenizer.py; media decoded by omnicore, whose decoders have their own parity tests) and
through `omnicore.data.process_sample`. Token ids must be equal, and positions equal HF `get_rope_index`
on a tiny HF thinker. Labels follow LLaMA-Factory's qwen2_omni rules.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from data_files import write_image, write_video, write_wav
from hf_reference import hf_thinker_config

from omnicore import TINY
from omnicore.data import (
    MLLM,
    OMNI_SYSTEM_PROMPT,
    ProcessorConfig,
    SampleContext,
    TemplateConfig,
    decode_audio,
    decode_image,
    decode_video,
    decode_video_audio,
    parse_record,
    process_sample,
)
from omnicore.data.formats import PLACEHOLDER
from omnicore.data.template import IGNORE_INDEX

transformers = pytest.importorskip("transformers")

CFG = ProcessorConfig()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_image(root / "a.png", 56, 84, seed=1)
    write_image(root / "b.png", 84, 112, seed=2)
    write_wav(root / "speech.wav", 1.3, seed=3)
    write_wav(root / "pair.wav", 3.2, seed=4)
    write_video(root / "talk.mp4", frames=12, fps=4, audio_seconds=3.0)
    write_video(root / "quiet.mp4", frames=8, fps=4)
    return root


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Qwen2_5OmniProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = Qwen2TokenizerFast.from_pretrained(model_dir)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=CFG.image_min_pixels, max_pixels=CFG.image_max_pixels),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=30),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration._from_config(hf_thinker_config(TINY))
    return processor, model


def _paired(kinds: list[str], use_aiv: bool) -> set[int]:
    """Positions of `<audio>` tags that belong to the `<video>` just before them (audio-in-video mode)."""
    return {t + 1 for t, k in enumerate(kinds[:-1]) if use_aiv and k == "video" and kinds[t + 1] == "audio"}


def _hf_messages(record: dict, use_aiv: bool) -> list[dict]:
    """The record as HF content parts; a video's paired `<audio>` tag is dropped (HF takes it from `audio=`)."""
    out = [] if "system" not in record else [{"role": "system", "content": [{"type": "text", "text": record["system"]}]}]
    for message in record["messages"]:
        pieces = PLACEHOLDER.split(message["content"])  # text, kind, text, kind, ..., text
        paired = _paired(pieces[1::2], use_aiv)
        parts = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0 and piece:
                parts.append({"type": "text", "text": piece})
            elif i % 2 == 1 and (i // 2) not in paired:
                parts.append({"type": piece})
        out.append({"role": message["role"], "content": parts})
    return out


def _hf_inputs(record: dict, root, use_aiv: bool, cfg: ProcessorConfig) -> dict:
    """Decoded media in HF's argument form; audio in token order (a video's audio at the video)."""
    images = [decode_image(open(root / p, "rb")) for p in record.get("images", [])]
    videos = [decode_video(open(root / p, "rb"), cfg).frames for p in record.get("videos", [])]
    audios, files, video_index = [], iter(record.get("audios", [])), 0
    for message in record["messages"]:
        kinds = PLACEHOLDER.findall(message["content"])
        paired = _paired(kinds, use_aiv)
        for t, kind in enumerate(kinds):
            if kind == "video" and use_aiv and t + 1 in paired:
                audios.append(decode_audio(open(root / next(files), "rb")))
            elif kind == "video" and use_aiv:
                audios.append(decode_video_audio(open(root / record["videos"][video_index], "rb")))
            elif kind == "audio" and t not in paired:
                audios.append(decode_audio(open(root / next(files), "rb")))
            video_index += kind == "video"
    return {
        "images": images or None,
        "videos": videos or None,
        "audio": [a.numpy() for a in audios] or None,
        "use_audio_in_video": use_aiv,
    }


RECORDS = {
    "text": {"messages": [{"role": "user", "content": "Name a prime number above 10."}, {"role": "assistant", "content": "11."}]},
    "system": {
        "system": "Answer in one short sentence.",
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    },
    "image": {
        "messages": [{"role": "user", "content": "<image>\nWhat animal is on the sofa?"}, {"role": "assistant", "content": "A grey cat."}],
        "images": ["a.png"],
    },
    "multi_turn_images": {
        "messages": [
            {"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Look again <image> and here <image> too."}, {"role": "assistant", "content": "Grey."},
        ],
        "images": ["a.png", "b.png", "a.png"],
    },
    "video": {
        "messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "Stripes change."}],
        "videos": ["quiet.mp4"],
    },
    "audio": {
        "messages": [{"role": "user", "content": "<audio>What instrument is playing?"}, {"role": "assistant", "content": "A violin."}],
        "audios": ["speech.wav"],
    },
    "everything": {
        "messages": [
            {"role": "user", "content": "<image> and <audio>, then <video>?"}, {"role": "assistant", "content": "All three."},
            {"role": "user", "content": "And <audio>"}, {"role": "assistant", "content": "Again."},
        ],
        "images": ["b.png"], "audios": ["speech.wav", "pair.wav"], "videos": ["quiet.mp4"],
    },
    "audio_in_video_track": {
        "messages": [{"role": "user", "content": "<video>What does the speaker announce?"}, {"role": "assistant", "content": "A delay."}],
        "videos": ["talk.mp4"], "use_audio_in_video": True,
    },
    "audio_in_video_pair": {
        "messages": [
            {"role": "user", "content": "<audio> first, then <video> and <audio>What is said?"},
            {"role": "assistant", "content": "Hi."},
        ],
        "videos": ["talk.mp4"], "audios": ["speech.wav", "pair.wav"], "use_audio_in_video": True,
    },
}  # fmt: skip


CASES = [(name, 2.0) for name in RECORDS] + [("audio_in_video_track", 1.0), ("audio_in_video_pair", 0.5)]


@pytest.mark.parametrize(("name", "fps"), CASES)
def test_token_ids_and_positions_match_hf(name, fps, media, hf, tokenizer):
    """fps 1 and 0.5 give 2 and 4 s per temporal grid: whole chunks per grid, and HF's lagging chunk counter."""
    processor, model = hf
    record, cfg = RECORDS[name], ProcessorConfig(video_fps=fps)
    use_aiv = record.get("use_audio_in_video", False)
    conv = parse_record(record, MLLM, source=str(media / "data.json"))
    sample = process_sample(conv, SampleContext(tokenizer=tokenizer, model=TINY, processor=cfg))
    with warnings.catch_warnings(), _quiet("root"), _quiet("transformers"):
        warnings.simplefilter("ignore")
        text = processor.apply_chat_template(_hf_messages(record, use_aiv), tokenize=False)
        ref = processor(text=text, return_tensors="pt", fps=fps, **_hf_inputs(record, media, use_aiv, cfg))
    assert sample.input_ids.tolist() == ref["input_ids"][0].tolist()
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in ref:
            assert torch.equal(sample.media[key], ref[key])
    if "feature_attention_mask" in ref:
        assert sample.media["audio_feature_lengths"].tolist() == ref["feature_attention_mask"].sum(-1).tolist()
    positions, _ = model.get_rope_index(
        ref["input_ids"], ref.get("image_grid_thw"), ref.get("video_grid_thw"), ref["attention_mask"], use_aiv,
        ref["feature_attention_mask"].sum(-1) if "feature_attention_mask" in ref else None,
        ref.get("video_second_per_grid"),
    )  # fmt: skip
    assert torch.equal(sample.positions, positions[:, 0])


class _quiet:
    """Silence a logger (HF warns about the non-Omni system prompt on every call)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _labelled(sample, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (TemplateConfig(), ["A cat.<|im_end|>\n", "Grey.<|im_end|>\n"]),
        (TemplateConfig(label_newline=False), ["A cat.<|im_end|>", "Grey.<|im_end|>"]),
        (TemplateConfig(mask_history=True), ["Grey.<|im_end|>\n"]),
    ],
)
def test_labels_follow_llama_factory(template, expected, media, tokenizer):
    conv = parse_record(RECORDS["multi_turn_images"], MLLM, source=str(media / "data.json"))
    sample = process_sample(conv, SampleContext(tokenizer=tokenizer, model=TINY, template=template))
    assert _labelled(sample, tokenizer) == expected
    assert sample.labels[0] == IGNORE_INDEX


def test_train_on_prompt_labels_all_but_media(media, tokenizer):
    conv = parse_record(RECORDS["multi_turn_images"], MLLM, source=str(media / "data.json"))
    sample = process_sample(conv, SampleContext(tokenizer=tokenizer, model=TINY, template=TemplateConfig(train_on_prompt=True)))
    s = tokenizer.special
    media_ids = torch.tensor([s.image, s.vision_bos, s.vision_eos])
    in_media = torch.isin(sample.input_ids, media_ids)
    assert torch.equal(sample.labels[~in_media], sample.input_ids[~in_media])
    assert (sample.labels[in_media] == IGNORE_INDEX).all()


def test_system_prompt_options(media, tokenizer):
    text_only = parse_record(RECORDS["text"], MLLM, source=str(media / "data.json"))
    rendered = {}
    for name, template in {
        "default": TemplateConfig(),
        "omni": TemplateConfig(system_prompt=OMNI_SYSTEM_PROMPT),
        "none": TemplateConfig(system_prompt=None),
    }.items():
        sample = process_sample(text_only, SampleContext(tokenizer=tokenizer, model=TINY, template=template))
        rendered[name] = tokenizer.decode(sample.input_ids.tolist())
    assert rendered["default"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert rendered["omni"].startswith(f"<|im_start|>system\n{OMNI_SYSTEM_PROMPT}<|im_end|>\n")
    assert rendered["none"].startswith("<|im_start|>user\nName a prime")
    # A record's own system prompt wins over the configured one.
    own = parse_record(RECORDS["system"], MLLM, source=str(media / "data.json"))
    sample = process_sample(own, SampleContext(tokenizer=tokenizer, model=TINY, template=TemplateConfig(system_prompt=OMNI_SYSTEM_PROMPT)))
    assert "Answer in one short sentence." in tokenizer.decode(sample.input_ids.tolist())
    assert "virtual human" not in tokenizer.decode(sample.input_ids.tolist())


def test_audio_in_video_setting_per_sample(media, tokenizer):
    """The template default applies unless the record sets `use_audio_in_video` itself."""
    record = dict(RECORDS["audio_in_video_track"])
    del record["use_audio_in_video"]
    s = tokenizer.special
    plain = process_sample(parse_record(record, MLLM, source=str(media / "x.json")), SampleContext(tokenizer=tokenizer, model=TINY))
    assert s.audio not in plain.input_ids.tolist() and "input_features" not in plain.media
    ctx = SampleContext(tokenizer=tokenizer, model=TINY, template=TemplateConfig(use_audio_in_video=True))
    mixed = process_sample(parse_record(record, MLLM, source=str(media / "x.json")), ctx)
    ids = mixed.input_ids.tolist()
    start = ids.index(s.vision_bos)
    assert ids[start + 1] == s.audio_bos and mixed.use_audio_in_video
    off = process_sample(parse_record(record | {"use_audio_in_video": False}, MLLM, source=str(media / "x.json")), ctx)
    assert off.input_ids.tolist() == plain.input_ids.tolist()
    np.testing.assert_array_equal(off.positions.numpy(), plain.positions.numpy())
