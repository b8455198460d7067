"""HF <-> native conversion: bit-exact round trips under many layouts, correct shards, the talker kept,
resharding, the CLI (omnicore's and MindSpeed-MM's spellings), and bad input leaving no checkpoint behind."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_reference import full_omni_folder

import omnicore
from omnicore.checkpoint.commit import META, TRACKER
from omnicore.checkpoint.hf import SafetensorsFolder
from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.config import TINY
from omnicore_dist.convert import main as convert

LAYOUTS = {
    "tp1_pp1": [],
    "tp2_pp2": ["--tp", "2", "--llm-pp-layers", "[1,2]", "--vit-pp-layers", "[4,0]", "--audio-pp-layers", "[2,0]"],
    "tp4_vit1_audio2_encoder_stage": ["--tp", "4", "--vit-tp", "1", "--audio-tp", "2", "--llm-pp-layers", "0,3", "--vit-pp-layers", "4,0", "--audio-pp-layers", "2,0"],
    "tp2_vit1_pp4": ["--tp", "2", "--vit-tp", "1", "--llm-pp-layers", "[[0,1,1,1]]", "--vit-pp-layers", "[[3,1,0,0]]", "--audio-pp-layers", "[[0,2,0,0]]"],
}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """A full tiny Qwen2.5-Omni (thinker in bf16, as published) saved by transformers."""
    folder = tmp_path_factory.mktemp("omni_hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = full_omni_folder(TINY, folder, thinker_dtype=torch.bfloat16)
    return folder, model


def _tensors(folder):
    store = SafetensorsFolder(folder)
    return {k: store.get(k) for k in store.keys()}


def _run(args):
    assert convert([str(a) for a in args]) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_exact(omni, tmp_path, layout):
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "native", *LAYOUTS[layout]])
    _run(["native-to-hf", "--native-dir", tmp_path / "native", "--hf-dir", hf, "--out-dir", tmp_path / "back"])
    before, after = _tensors(hf), _tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    assert json.loads((hf / SafetensorsFolder.INDEX).read_text())["weight_map"] == json.loads((tmp_path / "back" / SafetensorsFolder.INDEX).read_text())["weight_map"]
    for name in ("config.json", "generation_config.json", "spk_dict.pt", "tokenizer_config.json", "chat_template.json"):
        assert (hf / name).read_bytes() == (tmp_path / "back" / name).read_bytes(), name
    native = NativeCheckpoint(tmp_path / "native")
    assert (native.path / "hf" / "chat_template.json").exists() and not (native.path / "hf" / "spk_dict.pt").exists()


def test_reshard_equals_direct_conversion(omni, tmp_path):
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "a", *LAYOUTS["tp2_pp2"]])
    _run(["reshard", "--native-dir", tmp_path / "a", "--out-dir", tmp_path / "b", *LAYOUTS["tp4_vit1_audio2_encoder_stage"]])
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "c", *LAYOUTS["tp4_vit1_audio2_encoder_stage"]])
    files_b = json.loads((tmp_path / "b" / "release" / META).read_text())["files"]
    files_c = json.loads((tmp_path / "c" / "release" / META).read_text())["files"]
    assert files_b == files_c  # same names, sizes and sha256: byte-identical shards


def test_rank_files_hold_the_expected_slices(omni, tmp_path):
    """TP 4 text (kv heads 2: each on two ranks), TP 2 encoders: every piece against the HF tensor."""
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "n", "--tp", "4", "--vit-tp", "2", "--audio-tp", "2"])
    ref = _tensors(hf)
    d = TINY.text.head_dim
    step = tmp_path / "n" / "release"
    for r in range(4):
        f = SafetensorsFile(step / f"text-tp{r:02d}-pp00.safetensors")
        got = {k: f.read(k) for k in f.keys()}
        layer = "thinker.model.layers.1."
        assert torch.equal(got["text.layers.1.attn.q.weight"], ref[layer + "self_attn.q_proj.weight"][r * d : (r + 1) * d])
        assert torch.equal(got["text.layers.1.attn.v.bias"], ref[layer + "self_attn.v_proj.bias"][(r // 2) * d : (r // 2 + 1) * d])
        assert torch.equal(got["text.layers.1.attn.o.weight"], ref[layer + "self_attn.o_proj.weight"][:, r * d : (r + 1) * d])
        assert torch.equal(got["text.layers.1.mlp.up.weight"], ref[layer + "mlp.up_proj.weight"][r * 32 : (r + 1) * 32])
        assert torch.equal(got["text.embed.weight"], ref["thinker.model.embed_tokens.weight"][r * 128 : (r + 1) * 128])
        assert torch.equal(got["text.norm.weight"], ref["thinker.model.norm.weight"])
    for r in range(2):
        v = SafetensorsFile(step / f"vision-tp{r:02d}-pp00.safetensors")
        dv = TINY.vision.head_dim
        assert torch.equal(v.read("vision.blocks.2.attn.k.bias"), ref["thinker.visual.blocks.2.attn.k.bias"][r * dv : (r + 1) * dv])
        assert torch.equal(v.read("vision.merger.fc2.weight"), ref["thinker.visual.merger.mlp.2.weight"][:, r * 64 : (r + 1) * 64])
        assert torch.equal(v.read("vision.blocks.0.attn.o.bias"), ref["thinker.visual.blocks.0.attn.proj.bias"])
        a = SafetensorsFile(step / f"audio-tp{r:02d}-pp00.safetensors")
        assert torch.equal(a.read("audio.layers.0.mlp.fc1.weight"), ref["thinker.audio_tower.layers.0.fc1.weight"][r * 32 : (r + 1) * 32])
        assert torch.equal(a.read("audio.proj.weight"), ref["thinker.audio_tower.proj.weight"])


def test_hetero_encoders_are_stored_once_per_encoder_rank(omni, tmp_path):
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "n", "--tp", "4", "--vit-tp", "1", "--audio-tp", "1"])
    names = sorted(json.loads((tmp_path / "n" / "release" / META).read_text())["files"])
    assert [n for n in names if n.startswith(("vision", "audio"))] == ["audio-tp00-pp00.safetensors", "vision-tp00-pp00.safetensors"]
    assert len([n for n in names if n.startswith("text")]) == 4


def test_export_drives_transformers_and_matches_native_loading(omni, tmp_path):
    from transformers import Qwen2_5OmniForConditionalGeneration

    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "n", *LAYOUTS["tp2_pp2"]])
    _run(["native-to-hf", "--native-dir", tmp_path / "n", "--hf-dir", hf, "--out-dir", tmp_path / "e"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = Qwen2_5OmniForConditionalGeneration.from_pretrained(tmp_path / "e")
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(hf)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(exported.thinker(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                           model.thinker(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)  # fmt: skip
    for prefix in ("talker.", "token2wav."):
        mine = {k: v for k, v in exported.state_dict().items() if k.startswith(prefix)}
        theirs = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "Chelsie" in exported.speaker_map
    cfg, native = load_native(tmp_path / "n", dtype=torch.float32)
    _, from_hf = omnicore.load_hf(hf, dtype=torch.float32)
    batch = {"input_ids": ids, "labels": ids}
    assert torch.equal(omnicore.thinker_logits(native, cfg, batch), omnicore.thinker_logits(from_hf, cfg, batch))


def test_export_dtype_option(omni, tmp_path):
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "n"])
    _run(["native-to-hf", "--native-dir", tmp_path / "n", "--hf-dir", hf, "--out-dir", tmp_path / "e", "--dtype", "fp32"])
    out, ref = _tensors(tmp_path / "e"), _tensors(hf)
    assert out["thinker.lm_head.weight"].dtype == torch.float32 and torch.equal(out["thinker.lm_head.weight"], ref["thinker.lm_head.weight"].float())
    assert out["talker.codec_head.weight"].dtype == ref["talker.codec_head.weight"].dtype


def test_training_save_folder_exports_the_tracked_or_chosen_iteration(omni, tmp_path):
    from omnicore.checkpoint.native import DictSource, write_native

    hf, _ = omni
    cfg, params = omnicore.load_hf(hf)
    hf_config = json.loads((hf / "config.json").read_text())
    save = tmp_path / "save"
    for it, scale in ((10, 2.0), (20, 3.0)):
        write_native(save, cfg, hf_config, omnicore.layout.Layout(tp=2), DictSource({k: v * scale for k, v in params.items()}), iteration=it)
    assert (save / TRACKER).read_text() == "20"
    _run(["native-to-hf", "--native-dir", save, "--hf-dir", hf, "--out-dir", tmp_path / "latest"])
    _run(["native-to-hf", "--native-dir", save, "--iteration", "10", "--hf-dir", hf, "--out-dir", tmp_path / "ten"])
    w = "thinker.model.norm.weight"
    assert torch.equal(_tensors(tmp_path / "latest")[w], params["text.norm.weight"] * 3)
    assert torch.equal(_tensors(tmp_path / "ten")[w], params["text.norm.weight"] * 2)


def test_mindspeed_mm_convert_spelling(omni, tmp_path):
    hf, _ = omni
    mm = ["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf,
          "--cfg.parallel_config.llm_pp_layers", "[[1,2]]", "--cfg.parallel_config.vit_pp_layers", "[[4,0]]",
          "--cfg.parallel_config.audio_pp_layers", "[[2,0]]", "--cfg.parallel_config.tp_size", "2", "--cfg.trust_remote_code", "true"]  # fmt: skip
    _run(mm)
    assert NativeCheckpoint(tmp_path / "mm").layout.llm_pp_layers == (1, 2)
    back = ["Qwen2_5_OmniConverter", "mm_to_hf", "--cfg.save_hf_dir", tmp_path / "hf", "--cfg.mm_dir", tmp_path / "mm",
            "--cfg.hf_config.hf_dir", hf, "--cfg.parallel_config.llm_pp_layers", "[1,2]", "--cfg.parallel_config.tp_size", "2"]  # fmt: skip
    _run(back)
    assert _tensors(tmp_path / "hf").keys() == _tensors(hf).keys()
    wrong = back[:-1] + ["1"]
    wrong[3] = str(tmp_path / "hf2")
    assert convert([str(a) for a in wrong]) == 2
    with pytest.raises(SystemExit, match="did you mean --cfg.mm_dir"):
        convert(["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dirr", "x"])


def _looks_like_checkpoint(root):
    return root.exists() and ((root / TRACKER).exists() or any((p / META).exists() for p in root.iterdir() if p.is_dir()))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--llm-pp-layers", "1,1"], "llm_pp_layers \\[1, 1\\] sums to 2, but the text tower has 3 layers"),
        (["--llm-pp-layers", "1,2", "--vit-pp-layers", "4,0,0"], "vit_pp_layers \\[4, 0, 0\\] has 3 entries"),
        (["--llm-pp-layers", "1,2", "--vit-pp-layers", "2,2"], "vision encoder ends on stage 1 but the LLM starts on stage 0"),
        (["--tp", "3"], "tp = 3: .* cannot be split evenly over tensor-parallel size 3"),
        (["--tp", "2", "--vit-tp", "4"], "vit_tp = 4: vision.blocks.0.attn.q.weight: 2 heads cannot be split over tensor-parallel size 4"),
    ],
)
def test_bad_layouts_fail_before_writing(omni, tmp_path, capsys, args, message):
    hf, _ = omni
    assert convert(["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "n"), *args]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not _looks_like_checkpoint(tmp_path / "n")


def test_existing_checkpoint_needs_overwrite(omni, tmp_path, capsys):
    hf, _ = omni
    base = ["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "n")]
    _run(base)
    assert convert(base + ["--tp", "2"]) == 2
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err
    assert NativeCheckpoint(tmp_path / "n").layout.tp == 1
    _run(base + ["--tp", "2", "--overwrite"])
    assert NativeCheckpoint(tmp_path / "n").layout.tp == 2
    _run(["native-to-hf", "--native-dir", tmp_path / "n", "--hf-dir", hf, "--out-dir", tmp_path / "e"])
    assert convert(["native-to-hf", "--native-dir", str(tmp_path / "n"), "--hf-dir", str(hf), "--out-dir", str(tmp_path / "e")]) == 2


def test_corrupt_native_files_are_named(omni, tmp_path, capsys):
    hf, _ = omni
    _run(["hf-to-native", "--hf-dir", hf, "--out-dir", tmp_path / "n", "--tp", "2"])
    step = tmp_path / "n" / "release"
    victim = step / "text-tp01-pp00.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    args = ["native-to-hf", "--native-dir", str(tmp_path / "n"), "--hf-dir", str(hf), "--out-dir", str(tmp_path / "e")]
    assert convert(args) == 2
    assert "text-tp01-pp00.safetensors: sha256 does not match" in capsys.readouterr().err
    victim.write_bytes(bytes(data[:-50]))
    assert convert(args) == 2
    assert "text-tp01-pp00.safetensors: " in (err := capsys.readouterr().err) and "(truncated or replaced)" in err
    victim.unlink()
    assert convert(args) == 2
    assert "text-tp01-pp00.safetensors: listed in meta.json but missing" in capsys.readouterr().err
    (step / META).unlink()
    assert convert(args) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_bad_hf_folders_are_named(omni, tmp_path, capsys):
    import shutil

    hf, _ = omni
    broken = tmp_path / "hf"
    shutil.copytree(hf, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    args = ["hf-to-native", "--hf-dir", str(broken), "--out-dir", str(tmp_path / "n")]
    assert convert(args) == 2
    assert f"{shard.name}" in capsys.readouterr().err
    shard.unlink()
    assert convert(args) == 2
    assert f"{shard.name}: shard listed in the index is missing" in capsys.readouterr().err
    shutil.rmtree(broken)
    shutil.copytree(hf, broken)
    config = json.loads((broken / "config.json").read_text())
    config["thinker_config"]["text_config"]["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    assert convert(args) == 2
    assert "text.layers.0.mlp.down.weight: expected (64, 96), found (64, 128)" in capsys.readouterr().err
    assert not _looks_like_checkpoint(tmp_path / "n")


def test_progress_reports_every_byte_and_tensor(omni, tmp_path):
    from omnicore.checkpoint.convert import HFSource, hf_to_native
    from omnicore.layout import Layout

    hf, _ = omni
    seen = [0, 0]

    def progress(nbytes, tensors):
        seen[0] += nbytes
        seen[1] += tensors

    hf_to_native(hf, tmp_path / "n", Layout(tp=2), progress=progress)
    source = HFSource(hf)
    assert seen == [source.nbytes(), len(source.keys)]
