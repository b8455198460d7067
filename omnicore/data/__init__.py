"""The data pipeline. Media and processor layer: open media safely, decode, turn into model inputs.

    roots = MediaRoots.for_dataset("data/train.json", dataset_dir="data")
    cfg = ProcessorConfig()
    with roots.open("pics/cat.jpg") as f:
        batch = image_inputs([decode_image(f)], cfg)          # pixel_values, image_grid_thw
    with roots.open("clips/a.mp4") as f:
        batch |= video_inputs([decode_video(f, cfg)], cfg)    # pixel_values_videos, video_grid_thw, ...
    with roots.open("clips/a.mp4") as f:
        batch |= audio_inputs([decode_video_audio(f)], cfg)   # input_features, audio_feature_lengths

Every refusal or decoding failure is a `MediaError` (name, reason, detail). See docs/data.md.

Datasets, template and samples on top of it:

    cfg = load_data_config("data.json")                      # MindSpeed-MM data.json -> DataConfig
    convs = cfg.read_conversations()                          # train / val Conversations, DataStats
    model = omnicore.load_config(cfg.model_name_or_path)
    ctx = SampleContext.for_data(cfg, load_tokenizer(cfg.model_name_or_path), model)
    sample = process_sample(convs.train[0], ctx)              # input_ids, labels, positions, media
    omnicore.prepare_inputs(model, sample.batch())

A bad record is a `BadSample` (problem, detail, where, id); a damaged file a `DataFormatError`.

Cache and loader for training:

    cache = open_cache(cfg.cache_dir, convs.train, ctx, tokenizer_dir=cfg.model_name_or_path)  # built once per key
    sampler = StepSampler(n_samples=len(cache), global_batch=8, micro_batch=2, dp_size=1, seed=cfg.seed)
    for step in Loader(cache, sampler, num_workers=2).steps(consumed=0):
        ...                                                   # step.micro_batches: packed batches
"""

from omnicore.data.audio import decode_audio, decode_video_audio, resample
from omnicore.data.cache import CacheError, CorruptEntry, SampleCache, cache_key, open_cache, read_cache
from omnicore.data.config import DataConfig, DataConfigError, IgnoredFieldWarning, from_mindspeed, load_data_config
from omnicore.data.datasets import Conversations, DatasetSpec, load_conversations, split_validation, weighted
from omnicore.data.errors import BadSample, DataFormatError, DataStats, MediaLimitError, Problem
from omnicore.data.formats import LLAVA, MLLM, Attr, Conversation, Turn, iter_records, parse_record, read_dataset
from omnicore.data.image import decode_image
from omnicore.data.media import MediaError, MediaLimits, MediaRoots, Reason
from omnicore.data.processor import (
    ProcessorConfig,
    audio_features,
    audio_inputs,
    image_inputs,
    process_image,
    process_video,
    smart_resize,
    video_inputs,
)
from omnicore.data.length import LengthPolicy
from omnicore.data.loader import Loader, MemorySamples, StepBatch
from omnicore.data.sample import Sample, SampleContext, iter_samples, process_sample
from omnicore.data.sampler import StepSampler
from omnicore.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    OMNI_SYSTEM_PROMPT,
    MediaShapes,
    TemplateConfig,
    encode_conversation,
)
from omnicore.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from omnicore.data.video import VideoFrames, decode_video, video_from_frames

__all__ = [
    "MediaError",
    "MediaLimits",
    "MediaRoots",
    "Reason",
    "decode_image",
    "decode_video",
    "video_from_frames",
    "VideoFrames",
    "decode_audio",
    "decode_video_audio",
    "resample",
    "ProcessorConfig",
    "smart_resize",
    "process_image",
    "process_video",
    "image_inputs",
    "video_inputs",
    "audio_features",
    "audio_inputs",
    "Attr",
    "LLAVA",
    "MLLM",
    "Turn",
    "Conversation",
    "iter_records",
    "parse_record",
    "read_dataset",
    "DatasetSpec",
    "Conversations",
    "load_conversations",
    "split_validation",
    "weighted",
    "DataConfig",
    "DataConfigError",
    "IgnoredFieldWarning",
    "from_mindspeed",
    "load_data_config",
    "Problem",
    "BadSample",
    "DataFormatError",
    "MediaLimitError",
    "DataStats",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "TemplateConfig",
    "MediaShapes",
    "encode_conversation",
    "DEFAULT_SYSTEM_PROMPT",
    "OMNI_SYSTEM_PROMPT",
    "LengthPolicy",
    "SampleContext",
    "Sample",
    "process_sample",
    "iter_samples",
    "CacheError",
    "CorruptEntry",
    "SampleCache",
    "cache_key",
    "open_cache",
    "read_cache",
    "StepSampler",
    "Loader",
    "MemorySamples",
    "StepBatch",
]
