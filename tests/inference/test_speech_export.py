"""Speech output from an exported checkpoint: transformers' full Qwen2.5-Omni generates a waveform.

omnicore trains and runs the thinker only; the talker and token2wav travel through conversion
unchanged (byte-for-byte `spk_dict.pt`). This smoke test converts a complete tiny Omni folder
HF -> native -> HF with `omnicore-convert` and runs `Qwen2_5OmniForConditionalGeneration.generate(
..., return_audio=True, speaker="Chelsie")` on the export, with an image and an audio clip in the
prompt: the thinker's greedy text equals omnicore's decoding of the native checkpoint, and a
finite waveform comes out.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_reference import Piece, build_batch, full_omni_folder

from omnicore import TINY
from omnicore.checkpoint.native import load_native
from omnicore.generate import generate
from omnicore_dist.convert import main as convert


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full_omni_folder(TINY, root / "hf", seed=3)
    return root


def _load(folder):
    from transformers import Qwen2_5OmniForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2_5OmniForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _prompt():
    batch = build_batch(TINY, [[Piece("text", 3), Piece("image", grid=(1, 4, 4)), Piece("audio", 90), Piece("text", 3)]], seed=11)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_export_drives_the_talker_and_token2wav(exported):
    hf, native, out = exported / "hf", exported / "native", exported / "export"
    prompt = _prompt()
    assert convert(["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(native)]) in (0, None)
    assert convert(["native-to-hf", "--native-dir", str(native), "--hf-dir", str(hf), "--out-dir", str(out)]) in (0, None)
    assert (out / "spk_dict.pt").read_bytes() == (hf / "spk_dict.pt").read_bytes()

    model = _load(out)
    torch.manual_seed(0)  # the talker samples
    with torch.no_grad():
        text, wav = model.generate(
            **prompt, return_audio=True, speaker="Chelsie", thinker_max_new_tokens=8, thinker_do_sample=False,
            talker_max_new_tokens=16,
        )  # fmt: skip
    assert torch.is_tensor(wav) and wav.dim() == 1 and wav.dtype == torch.float32
    assert wav.numel() > 0 and bool(torch.isfinite(wav).all())
    # The exported thinker is omnicore's: its greedy text is what omnicore decodes from the native checkpoint.
    cfg, params = load_native(native, dtype=torch.float32)
    new = text[0, prompt["input_ids"].shape[1] :].tolist()
    assert new, "the thinker produced no text"
    ours = generate(params, cfg, prompt, max_new_tokens=len(new))[0]
    assert ours == new
