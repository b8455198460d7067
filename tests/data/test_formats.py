"""Dataset readers: the three layouts, turn rules, placeholder counts, malformed files, several datasets
(caps, weights, validation split), and a hypothesis fuzz test over random records."""

from __future__ import annotations

import json
import pickle

import pytest
from data_files import write_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnicore.data import (
    LLAVA,
    MLLM,
    Attr,
    BadSample,
    DataFormatError,
    DataStats,
    DatasetSpec,
    Problem,
    iter_records,
    load_conversations,
    parse_record,
    read_dataset,
)


def _llava(i, image="000000123456.jpg"):
    record = {"id": f"{i:012d}", "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "Three."}]}
    if image is None:
        record["conversations"][0]["value"] = "How many primes below 10?"
    else:
        record["image"] = image
    return record


def _mllm(i, n_images=0):
    return {
        "messages": [{"role": "user", "content": "<image>" * n_images + f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
        "images": [f"{i}.jpg"] * n_images,
    }


def test_llava_shapes_mixed_in_one_file(tmp_path):
    """The seed's raw shapes: `image` as a string, as a list, and absent (text-only), in one dataset."""
    records = [_llava(0), _llava(1, image=None), _llava(2, image=["a.jpg"])]
    convs, stats = read_dataset(write_json(tmp_path / "llava.json", records))
    assert [c.images for c in convs] == [("000000123456.jpg",), (), ("a.jpg",)]
    assert convs[0].id == "000000000000" and convs[0].turns[0].role == "user" and convs[0].turns[1].text == "Three."
    assert stats.counts["records"] == 3 and stats.dropped == 0


def test_mllm_and_sharegpt_mapping(tmp_path):
    record = {
        "system": "Answer in one short sentence.",
        "messages": [{"role": "user", "content": "<audio>What instrument?"}, {"role": "assistant", "content": "A violin."}],
        "audios": "sounds/violin.wav",
    }
    conv = parse_record(record, MLLM)
    assert conv.system == "Answer in one short sentence." and conv.audios == ("sounds/violin.wav",)
    custom = Attr(messages="chat", role_tag="speaker", content_tag="text", user_tag="q", assistant_tag="a",
                  system_tag="sys", images="pictures", system="instructions")  # fmt: skip
    odd = {
        "chat": [{"speaker": "sys", "text": "Be brief."}, {"speaker": "q", "text": "<image>Hi"}, {"speaker": "a", "text": "Hello"}],
        "pictures": ["p.png"],
        "instructions": "ignored: the first system-role message wins",
    }
    conv = parse_record(odd, custom)
    assert conv.system == "Be brief." and [t.role for t in conv.turns] == ["user", "assistant"] and conv.images == ("p.png",)
    # The column is read when there is no system-role message.
    del odd["chat"][0]
    assert parse_record(odd, custom).system == "ignored: the first system-role message wins"


def test_video_audio_pairs_and_frame_lists():
    record = {
        "messages": [{"role": "user", "content": "<video><audio>What does the speaker announce?"}, {"role": "assistant", "content": "A delay."}],
        "videos": [["f0.png", "f1.png"]],
        "audios": ["clips/station.wav"],
        "use_audio_in_video": True,
    }
    conv = parse_record(record, MLLM)
    assert conv.videos == (("f0.png", "f1.png"),) and conv.audios == ("clips/station.wav",) and conv.use_audio_in_video


def test_image_and_video_records_with_the_recipe_attr(tmp_path):
    """The recipe's attr (images null, videos/audios set) reads image data too: no config edit."""
    recipe = Attr(messages="messages", role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                  videos="videos", audios="audios")  # fmt: skip
    video = {"messages": [{"role": "user", "content": "<video><audio>Q"}, {"role": "assistant", "content": "A"}],
             "videos": ["4.mp4"], "audios": ["4.mp3"]}  # fmt: skip
    files = [write_json(tmp_path / "images.json", [_mllm(0, 1), _llava(1)]), write_json(tmp_path / "video.json", [video])]
    out = load_conversations([DatasetSpec(path=f) for f in files], attr=recipe)
    assert [len(c.images) + len(c.videos) for c in out.train] == [1, 1, 1] and out.stats.dropped == 0


@pytest.mark.parametrize(
    ("record", "problem", "detail"),
    [
        ([1, 2], Problem.NOT_OBJECT, "JSON object"),
        ({"id": 7}, Problem.MISSING_KEY, "no message list"),
        ({"messages": "hi"}, Problem.WRONG_TYPE, "must be a list"),
        ({"messages": [{"role": "user"}]}, Problem.MISSING_KEY, "has no 'content'"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, Problem.WRONG_TYPE, "content must be a string"),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, Problem.TURN_ORDER, "message 1"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, Problem.TURN_ORDER, "message 2"),
        ({"messages": [{"role": "user", "content": "x"}]}, Problem.TURN_ORDER, "end on an assistant"),
        ({"messages": []}, Problem.TURN_ORDER, "0 turn"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "observation", "content": "y"}]}, Problem.UNSUPPORTED_ROLE, "tool"),
        ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]}, Problem.PLACEHOLDERS, "1 <image> tag(s) but 0"),
        (_mllm(0, 2) | {"images": ["only-one.jpg"]}, Problem.PLACEHOLDERS, "2 <image> tag(s) but 1"),
        (_mllm(0) | {"audios": ["extra.wav"]}, Problem.PLACEHOLDERS, "0 <audio> tag(s) but 1"),
        (_mllm(0) | {"images": {"a": 1}}, Problem.WRONG_TYPE, "'images' must be a path"),
        (_mllm(0) | {"videos": [3]}, Problem.WRONG_TYPE, "videos[0] must be a path"),
        (_mllm(0) | {"use_audio_in_video": "yes"}, Problem.WRONG_TYPE, "true or false"),
        (_mllm(0) | {"system": ["x"]}, Problem.WRONG_TYPE, "'system' must be a string"),
    ],
)
def test_bad_records_are_named(record, problem, detail):
    with pytest.raises(BadSample) as info:
        parse_record(record, MLLM, source="d.jsonl", index=4, line=5)
    assert info.value.problem == problem
    assert detail in info.value.detail
    assert info.value.where == "d.jsonl:5"


def test_bad_records_are_dropped_and_counted_or_raised(tmp_path):
    bad_order = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "id": "swap"}
    path = write_json(tmp_path / "d.json", [_mllm(0), bad_order, _mllm(1, 1) | {"images": []}, _mllm(2)])
    convs, stats = read_dataset(path, MLLM)
    assert [c.index for c in convs] == [0, 3]
    assert stats.counts["dropped: invalid turn order"] == 1
    assert stats.counts["dropped: placeholder/media count mismatch"] == 1
    assert [b.id for b in stats.bad] == ["swap", "#2"] and stats.bad[0].where == f"{path}[1]"
    with pytest.raises(BadSample, match="invalid turn order"):
        read_dataset(path, MLLM, on_bad_sample="error")


def test_malformed_json_names_file_and_line(tmp_path):
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(_mllm(0)) + "\n\n" + json.dumps(_mllm(1)) + "\n" + '{"messages": [}\n')
    with pytest.raises(DataFormatError) as info:
        list(iter_records(lines))
    assert info.value.line == 4 and str(lines) in str(info.value) and ":4:" in str(info.value)
    array = tmp_path / "d.json"
    array.write_text('[\n  {"messages": []},\n  {"messages": [,]}\n]')
    with pytest.raises(DataFormatError) as info:
        read_dataset(array)
    assert (info.value.line, info.value.column) == (3, 17)
    (tmp_path / "obj.json").write_text('[1')
    with pytest.raises(DataFormatError, match="obj.json:1:3"):
        read_dataset(tmp_path / "obj.json")
    (tmp_path / "latin.jsonl").write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match="latin.jsonl:2: invalid UTF-8"):
        read_dataset(tmp_path / "latin.jsonl")
    with pytest.raises(DataFormatError, match="cannot read"):
        read_dataset(tmp_path / "absent.json")
    # JSONL records know their line; JSON records their index.
    good = tmp_path / "good.jsonl"
    good.write_text("\n" + json.dumps(_mllm(0)) + "\n")
    assert read_dataset(good, MLLM)[0][0].where == f"{good}:2"


def test_caps_weights_and_validation_split(tmp_path):
    a = write_json(tmp_path / "a.json", [_mllm(i) for i in range(10)])
    b = write_json(tmp_path / "b.json", [_mllm(100 + i) for i in range(10)])
    # max_samples on the concatenation: first 13 = all of a, then 3 of b.
    out = load_conversations([DatasetSpec(path=a), DatasetSpec(path=b)], attr=MLLM, max_samples=13)
    assert [c.source for c in out.train].count(str(b)) == 3 and len(out.train) == 13
    # per-dataset max_samples, and weights (2 = twice, 0.5 = a hashed half)
    out = load_conversations([DatasetSpec(path=a, max_samples=4, weight=2), DatasetSpec(path=b, weight=0.5)], attr=MLLM)
    from_a = [c.index for c in out.train if c.source == str(a)]
    assert from_a == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len([c for c in out.train if c.source == str(b)]) == 5
    # validation split: ceil(0.25 * 10) per dataset, deterministic, disjoint, stable when b is dropped
    specs = [DatasetSpec(path=a), DatasetSpec(path=b)]
    one = load_conversations(specs, attr=MLLM, val_ratio=0.25, seed=3)
    two = load_conversations(specs, attr=MLLM, val_ratio=0.25, seed=3)
    assert one.val == two.val and len(one.val) == 6 and len(one.train) == 14
    assert not {(c.source, c.index) for c in one.val} & {(c.source, c.index) for c in one.train}
    alone = load_conversations(specs[:1], attr=MLLM, val_ratio=0.25, seed=3)
    assert alone.val == tuple(c for c in one.val if c.source == str(a))
    assert load_conversations(specs, attr=MLLM, val_ratio=0.25, seed=4).val != one.val
    extra = load_conversations(specs[:1], attr=MLLM, val_datasets=[DatasetSpec(path=b)], val_max_samples=4)
    assert len(extra.train) == 10 and [c.source for c in extra.val] == [str(b)] * 4


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["messages", "conversations", "images", "image", "videos", "audios", "system", "id",
                         "role", "content", "from", "value", "use_audio_in_video"])  # fmt: skip
_turn = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"]) | _json,
    "content": st.sampled_from(["<image>", "<video><audio>", "hi", "<audio>"]) | _json,
    "from": st.sampled_from(["human", "gpt"]) | _json,
    "value": st.text(max_size=10) | _json,
})  # fmt: skip
_record = st.dictionaries(_keys, _json | st.lists(_turn, max_size=4) | st.lists(st.text(max_size=5), max_size=3), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_record | _json)
def test_fuzz_records_raise_only_bad_sample(record):
    for attr in (LLAVA, MLLM):
        try:
            conv = parse_record(record, attr, source="fuzz.json")
        except BadSample as e:
            assert isinstance(e.problem, Problem) and e.where == "fuzz.json[0]"
            continue
        assert len(conv.turns) % 2 == 0 and conv.turns[-1].role == "assistant"
        assert sum(t.text.count("<image>") for t in conv.turns) + (conv.system or "").count("<image>") == len(conv.images)


def test_errors_pickle_and_stats_merge():
    bad = BadSample(Problem.TURN_ORDER, "message 1", "d.json[3]", "x7")
    back = pickle.loads(pickle.dumps(bad))  # test-only: errors cross data-loader worker processes
    assert (back.problem, back.detail, back.where, back.id) == (Problem.TURN_ORDER, "message 1", "d.json[3]", "x7")
    assert str(back) == "d.json[3] (id x7): invalid turn order: message 1"
    fmt = pickle.loads(pickle.dumps(DataFormatError("d.jsonl", 4, 2, "malformed JSON line")))
    assert str(fmt) == "d.jsonl:4:2: malformed JSON line" and fmt.line == 4
    one, two = DataStats(), DataStats()
    one.count("records", 2)
    one.reject(bad)
    two.count("conversations", 0)
    merged = one.merge(two)
    assert merged.counts == {"records": 2, "dropped: invalid turn order": 1, "conversations": 0}
    assert merged.dropped == 1 and merged.bad == [bad] and "records: 2" in merged.report()
