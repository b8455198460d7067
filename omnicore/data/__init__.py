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
"""

from omnicore.data.audio import decode_audio, decode_video_audio, resample
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
]
