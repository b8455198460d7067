"""Preprocessing throughput (samples/s): omnicore's data pipeline vs transformers 4.52.4's
`Qwen2_5OmniProcessor`, on the same media mix, timed alternately in one process.

Mix (made here, one medium per sample): 6 JPEG images (640x480, 1024x768, 1280x720), 3 WAV clips
(44.1 kHz stereo; 5, 10 and 20 s) and a 4 s H.264 video (320x240, 25 fps).
- hf: every sample each time: Pillow decode, `librosa.load(sr=16000)`, the video's frames from omnicore's
  decoder (the same frames on both sides; qwen-omni-utils is not installed), the chat template, then the
  processor with Qwen2.5-Omni's preprocessor settings (Whisper window 300 s, pixel bounds 3136..12845056).
- cold: read the dataset file, compute the cache key (hash every file), process every sample, write the
  cache (a new folder each round). Positions and labels are computed too (HF leaves them to the model / trainer).
- warm: read the dataset file, compute the key, open the cache and load every sample (checksums verified).
All three run with one torch thread (as loader workers do) in the same process, alternating per round.
Correctness first: token ids equal, pixel values, grids and valid audio frames close to HF's.

    python -m pytest benches/bench_data.py -s -p no:cacheprovider                 # full run, bench_results/data.json
    python -m pytest benches/bench_data.py -s -p no:cacheprovider --bench-quick   # correctness and a short timing
"""

from __future__ import annotations

import shutil
import sys
import warnings
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "data"), str(Path(__file__).resolve().parents[1] / "tests")]

from common import alternate, check_close, gate, ratio_summary, write_record  # noqa: E402
from data_files import write_json  # noqa: E402
from media_samples import painted_video  # noqa: E402
from tiny_tokenizer import write_tokenizer  # noqa: E402

from omnicore import TINY  # noqa: E402
from omnicore.data import (  # noqa: E402
    MLLM,
    ProcessorConfig,
    SampleContext,
    decode_video,
    load_tokenizer,
    open_cache,
    read_dataset,
)

COLD_GOAL = 2.0  # omnicore building its cache vs HF processing, samples/s ratio (median over rounds)
WARM_GOAL = 20.0  # omnicore reading its cache vs HF processing
CFG = ProcessorConfig()  # Qwen2.5-Omni's own settings (the checkpoint's preprocessor_config.json)
IMAGES = [(480, 640), (768, 1024), (720, 1280)] * 2
CLIPS = [5.0, 10.0, 20.0]


def _image(path: Path, height: int, width: int, seed: int) -> None:
    """A photo-like JPEG: smooth colour ramps plus noise (compresses like a photograph, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(path, quality=90)


def _clip(path: Path, seconds: float, seed: int) -> None:
    rate = 44100
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
    soundfile.write(path, wave.astype(np.float32), rate, subtype="PCM_16")


def _turns(tag: str, k: int) -> list[dict]:
    return [{"role": "user", "content": f"{tag}Describe item {k} in one sentence."}, {"role": "assistant", "content": "A cat."}]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    records = []
    for k, (h, w) in enumerate(IMAGES):
        _image(root / f"img{k}.jpg", h, w, seed=k)
        records.append({"messages": _turns("<image>", k), "images": [f"img{k}.jpg"]})
    for k, seconds in enumerate(CLIPS):
        _clip(root / f"clip{k}.wav", seconds, seed=k)
        records.append({"messages": _turns("<audio>", k), "audios": [f"clip{k}.wav"]})
    (root / "talk.mp4").write_bytes(painted_video(100, 25, height=240, width=320))
    records.append({"messages": _turns("<video>", 0), "videos": ["talk.mp4"]})
    write_json(root / "data.json", records)
    model_dir = write_tokenizer(root / "tokenizer")
    return root, model_dir, records


def _hf_processor(model_dir: Path):
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    tok = Qwen2TokenizerFast.from_pretrained(model_dir)
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=CFG.image_min_pixels, max_pixels=CFG.image_max_pixels),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=CFG.n_mels, chunk_length=300),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )


def _hf_one(processor, root: Path, record: dict) -> dict:
    """One record through HF: decode its medium, render the template, run the processor."""
    import librosa

    media, parts = {}, []
    if record.get("images"):
        with Image.open(root / record["images"][0]) as im:
            media["images"] = [im.convert("RGB")]
        parts.append({"type": "image"})
    if record.get("audios"):
        media["audio"] = [librosa.load(root / record["audios"][0], sr=CFG.sampling_rate)[0]]
        parts.append({"type": "audio"})
    if record.get("videos"):
        with open(root / record["videos"][0], "rb") as f:
            media["videos"] = [decode_video(f, CFG).frames]
        parts.append({"type": "video"})
    user, answer = record["messages"]
    text = user["content"].split(">", 1)[1]
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer["content"]}]}]  # fmt: skip
    rendered = processor.apply_chat_template(messages, tokenize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the processor warns that the system prompt is not the Omni one
        return processor(text=rendered, return_tensors="pt", use_audio_in_video=False, **media)


def _check(hf: dict, ours: dict) -> None:
    assert hf["input_ids"][0].tolist() == ours["input_ids"].tolist()
    for key in ("pixel_values", "pixel_values_videos"):
        if key in ours:
            grid = "image_grid_thw" if key == "pixel_values" else "video_grid_thw"
            assert torch.equal(hf[grid], ours[grid])
            check_close(ours[key], hf[key], atol=1e-5, what=key)
    if "input_features" in ours:
        valid = int(hf["feature_attention_mask"].sum())
        assert valid == int(ours["audio_feature_lengths"][0])
        check_close(ours["input_features"], hf["input_features"][0, :, :valid], atol=1e-4, what="input_features")


def test_preprocessing_throughput_vs_hf(mix, bench_rounds, benchmark, tmp_path, pytestconfig):
    root, model_dir, records = mix
    ctx = SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY, processor=CFG)
    processor = _hf_processor(model_dir)
    rounds = count()

    def hf():
        return [_hf_one(processor, root, r) for r in records]

    def cold():
        convs, _ = read_dataset(root / "data.json", MLLM)
        folder = tmp_path / f"cold{next(rounds)}"
        cache = open_cache(folder, convs, ctx, tokenizer_dir=model_dir, progress=False)
        cache.close()
        return folder

    def warm():
        convs, _ = read_dataset(root / "data.json", MLLM)
        cache = open_cache(tmp_path / "warm", convs, ctx, tokenizer_dir=model_dir, progress=False)
        return [cache.load(i) for i in range(len(cache))]

    ours = warm()
    assert len(ours) == len(records)
    for got, want in zip(ours, hf()):
        _check(want, got)

    # One thread, as in data-loader workers (torch's DataLoader and omnicore's both set it): on a
    # shared machine, intra-op threads contending for busy cores swamp the small ops of both sides.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = alternate({"hf": hf, "cold": cold, "warm": warm}, rounds=bench_rounds, warmup=1)
    finally:
        torch.set_num_threads(threads)
    for folder in tmp_path.glob("cold*"):
        shutil.rmtree(folder)
    n = len(records)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    cold_ratio, warm_ratio = ratio_summary(times["hf"], times["cold"]), ratio_summary(times["hf"], times["warm"])
    record = {
        "samples": n,
        "mix": {"images": len(IMAGES), "audio_clips": len(CLIPS), "videos": 1},
        "samples_per_s": {k: n / t for k, t in med.items()},
        "cold_vs_hf": cold_ratio,
        "warm_vs_hf": warm_ratio,
        "goals": {"cold": COLD_GOAL, "warm": WARM_GOAL},
        "rounds": bench_rounds,
        "torch_threads": 1,
    }
    benchmark.extra_info.update(record)
    benchmark.pedantic(warm, rounds=1, iterations=1)
    write_record("data", record)
    rates = record["samples_per_s"]
    print(
        f"\nsamples/s: hf {rates['hf']:.2f}, omnicore cold {rates['cold']:.2f}, warm {rates['warm']:.1f}; "
        f"cold / hf median {cold_ratio['median']:.2f} (min {cold_ratio['min']:.2f}, max {cold_ratio['max']:.2f}), "
        f"warm / hf median {warm_ratio['median']:.1f} (min {warm_ratio['min']:.1f}, max {warm_ratio['max']:.1f})"
    )
    quick = pytestconfig.getoption("--bench-quick")
    gate(cold_ratio, COLD_GOAL, quick=quick, what="cold cache vs HF processor")
    gate(warm_ratio, WARM_GOAL, quick=quick, what="warm cache vs HF processor")
