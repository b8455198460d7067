"""`python -m omnicore.data.llava_to_mllm`: LLaVA-Instruct records -> mllm, paths relative to the output,
missing images skipped and counted, unknown roles named, no silent overwrite, atomic write."""

from __future__ import annotations

import json
import runpy
import sys
import warnings
from unittest import mock
from pathlib import Path

import pytest
from data_files import write_image, write_json

from omnicore.data import MLLM, read_dataset
from omnicore.data.llava_to_mllm import _arguments, main


def _record(i: int, image: str | None) -> dict:
    record = {"id": f"{i:012d}", "conversations": [
        {"from": "human", "value": "<image>\nHow many bicycles?" if image else "Name a prime."},
        {"from": "gpt", "value": "Three."}, {"from": "human", "value": "Is anyone riding one?"}, {"from": "gpt", "value": "No."},
    ]}  # fmt: skip
    return record | ({"image": image} if image else {})


@pytest.fixture
def layout(tmp_path):
    coco = tmp_path / "data" / "COCO2017"
    write_image(coco / "train2017" / "000000000001.jpg", 56, 56)
    write_image(coco / "train2017" / "000000000003.jpg", 56, 56)
    llava = write_json(tmp_path / "data" / "llava_instruct_150k.json", [
        _record(1, "000000000001.jpg"), _record(2, "000000000002.jpg"), _record(3, "000000000003.jpg"), _record(4, None),
    ])  # fmt: skip
    return coco, llava, tmp_path / "data" / "out" / "mllm_format_llava_instruct_data.json"


def test_converts_with_paths_relative_to_the_output(layout, capsys):
    coco, llava, output = layout
    assert main(["--coco-path", str(coco), "--llava-json", str(llava), "--output", str(output)]) == 0
    summary = capsys.readouterr().out
    assert "4 records: 3 written" in summary and "(1 text-only)" in summary and "1 skipped (image missing)" in summary
    records = json.loads(output.read_text())
    assert [r["id"] for r in records] == ["000000000001", "000000000003", "000000000004"]
    assert records[0]["images"] == ["../COCO2017/train2017/000000000001.jpg"] and records[2]["images"] == []
    assert records[0]["messages"][0] == {"role": "user", "content": "<image>\nHow many bicycles?"}
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    # The result reads back as an mllm dataset whose image paths resolve from the file's folder.
    convs, stats = read_dataset(output, MLLM)
    assert len(convs) == 3 and stats.dropped == 0
    assert (output.parent / convs[0].images[0]).resolve() == (coco / "train2017" / "000000000001.jpg").resolve()
    assert list(output.parent.glob(".*.tmp")) == []


def test_refuses_to_overwrite_and_names_unknown_roles(layout, capsys):
    coco, llava, output = layout
    args = ["--coco-path", str(coco), "--llava-json", str(llava), "--output", str(output)]
    output.parent.mkdir(parents=True)
    output.write_text("keep me")
    assert main(args) == 1 and output.read_text() == "keep me"
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and len(json.loads(output.read_text())) == 3
    bad = json.loads(llava.read_text())
    bad[2]["conversations"][1]["from"] = "robot"
    write_json(llava, bad)
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "record 2 (id '000000000003')" in err and "'robot'" in err
    assert len(json.loads(output.read_text())) == 3  # the previous output is intact


def test_recipe_defaults_and_module_entry_point(tmp_path, capsys):
    args = _arguments([])
    assert args.coco_path == Path("./data/COCO2017")
    assert args.llava_json == Path("./data/llava_instruct_150k.json")
    assert args.output == Path("./data/mllm_format_llava_instruct_data.json") and not args.overwrite
    (tmp_path / "broken.json").write_text("[{]")
    argv = ["llava_to_mllm", "--llava-json", str(tmp_path / "broken.json"), "--output", str(tmp_path / "o.json")]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported above
        runpy.run_module("omnicore.data.llava_to_mllm", run_name="__main__")
    assert info.value.code == 2 and "broken.json:1:3" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
