"""`python -m omnicore.data.inspect DATA_CONFIG`: modality counts, length histogram, a rendered sample with
its label mask, bad samples with reasons."""

from __future__ import annotations

import io
import warnings

from data_files import write_image, write_json, write_wav

from omnicore.data.inspect import histogram, main, render_labels


def test_inspect_reports_a_dataset(tmp_path, model_dir):
    data = tmp_path / "data"
    write_image(data / "cat.png", 56, 56)
    write_wav(data / "violin.wav", 1.0)
    write_json(data / "mixed.json", [
        {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]},
        {"messages": [{"role": "user", "content": "<audio>Which instrument?"}, {"role": "assistant", "content": "A violin."}], "audios": ["violin.wav"]},
        {"id": "plain", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "gone", "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}], "images": ["nope.png"]},
        {"id": "swapped", "messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    ])  # fmt: skip
    config = write_json(tmp_path / "data.json", {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {"model_name_or_path": str(model_dir)},
            "basic_parameters": {"template": "qwen2_omni", "dataset": str(data / "mixed.json")},
            "attr": {"messages": "messages", "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    })  # fmt: skip
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(config), "--sample", "0"], out=out) == 0
    text = out.getvalue()
    assert "4 train + 0 val conversations, 3 of 4 processed" in text
    assert "modalities (samples): audio 1, image 1, text 1" in text
    assert "token lengths:" in text and "#" in text
    assert "[[A cat.<|im_end|>\n]]" in text and "<|IMAGE|>x4" in text  # the 56 x 56 image is 4 tokens
    assert "(id gone): media error: media 'nope.png': missing" in text
    assert "(id swapped): invalid turn order" in text
    assert "dropped: invalid turn order: 1" in text and "dropped: media error: 1" in text


def test_cli_errors_and_helpers(tmp_path, tokenizer, capsys):
    assert main([str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert histogram([1, 2, 3, 30], bins=3) == [
        "  [      0,      11)  ######################################## 3",
        "  [     11,      22)   0",
        "  [     22,      33)  ############# 1",
    ]
    s = tokenizer.special
    answer = tokenizer.encode("ok")
    prompt = [s.im_start] + tokenizer.encode("user\n") + [s.vision_bos, s.image, s.image, s.vision_eos]
    ids, labels = prompt + answer, [-100] * len(prompt) + answer
    assert render_labels(tokenizer, ids, labels) == "<|im_start|>user\n<|vision_bos|><|IMAGE|>x2<|vision_eos|>[[ok]]"
