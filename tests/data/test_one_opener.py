"""Every media file is opened through the one opener, `MediaRoots.open`: with it swapped for a
recording one, processing records of every media kind (plus paths that escape the roots) shows the
decoding libraries (Pillow, PyAV, soundfile) receiving only the opener's file objects, never a path
string, and every file they read inside the roots."""

from __future__ import annotations

import os
from pathlib import Path

import av
import PIL.Image
import pytest
import soundfile
from data_files import write_image, write_json, write_video, write_wav

import omnicore.data.audio as audio_module
import omnicore.data.image as image_module
import omnicore.data.video as video_module
from omnicore import TINY
from omnicore.data import MLLM, BadSample, MediaRoots, SampleContext, load_tokenizer, process_sample, read_dataset


def _turn(question: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "Yes."}]


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_wav(root / "clip.wav", 1.2)
    write_video(root / "talk.mp4", frames=8, fps=4, audio_seconds=2.0)
    write_image(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    records = [
        {"messages": _turn("<image>What?"), "images": ["a.png"]},
        {"messages": _turn("<audio>What?"), "audios": ["clip.wav"]},
        {"messages": _turn("<video>What?"), "videos": ["talk.mp4"]},
        {"messages": _turn("<video>What?"), "videos": ["talk.mp4"], "use_audio_in_video": True},
        {"messages": _turn("<image>What?"), "images": ["../outside.png"]},
        {"messages": _turn("<image>What?"), "images": [str(tmp_path / "outside.png")]},
        {"messages": _turn("<image>What?"), "images": ["link.png"]},
        {"messages": _turn("<image>What?"), "images": ["file:///etc/passwd"]},
    ]
    write_json(root / "data.json", records)
    return root


def test_decoders_only_ever_see_files_the_opener_opened_inside_the_roots(dataset, model_dir, monkeypatch):
    opened: list[str] = []  # real paths the opener handed out
    seen: list[object] = []  # what the decoding libraries received
    real_open = MediaRoots.open

    def recording_open(self, path):
        f = real_open(self, path)
        opened.append(os.path.realpath(f.name))
        return f

    monkeypatch.setattr(MediaRoots, "open", recording_open)
    for module, name, real in ((image_module.Image, "open", PIL.Image.open), (video_module.Image, "open", PIL.Image.open),
                               (audio_module.soundfile, "SoundFile", soundfile.SoundFile), (audio_module.av, "open", av.open),
                               (video_module.av, "open", av.open)):  # fmt: skip
        monkeypatch.setattr(module, name, lambda source, *a, _real=real, **k: (seen.append(source), _real(source, *a, **k))[1])

    convs, _ = read_dataset(dataset / "data.json", MLLM)
    ctx = SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY)
    outcomes = []
    for conv in convs:
        try:
            process_sample(conv, ctx)
            outcomes.append("ok")
        except BadSample as err:
            outcomes.append(str(err))
    assert outcomes[:4] == ["ok"] * 4
    assert all("outside the media roots" in o for o in outcomes[4:7]), outcomes  # "..", an absolute path, a symlink out
    assert "URL paths are refused" in outcomes[7], outcomes
    assert seen and not any(isinstance(s, (str, os.PathLike)) for s in seen), seen
    real_root = os.path.realpath(dataset)
    assert opened and all(p.startswith(real_root + os.sep) for p in opened), opened
    names = {os.path.realpath(getattr(s, "name", "")) for s in seen if isinstance(getattr(s, "name", None), str)}
    assert names <= set(opened), names - set(opened)  # every file a library read came from the opener
