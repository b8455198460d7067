"""`omnicore.chat` and `omnicore.eval` on the trained demo model; bad inputs give clear errors.

The demo is made and trained once per session (conftest `trained_demo`, the launcher with
examples/demo.toml). Its media questions are answered correctly from the native checkpoint and
from the HF export, as one question, streamed, and interactively from stdin; the question file
scores them; a missing media file, a checkpoint without a tokenizer and an over-long prompt each
stop with one line naming the problem.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omnicore import chat
from omnicore import eval as omni_eval

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from make_demo import DEMO_QUESTIONS  # noqa: E402

# The questions whose answers can only come from the media (and the word each answer must name).
MEDIA_QUESTIONS = [(kind, path, question, word) for kind, path, question, word in DEMO_QUESTIONS]


class _Chunks(io.StringIO):
    """stdout that remembers every write (to see the answer arrive in pieces)."""

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


def _ask(argv: list[str], stdin: str = "") -> tuple[int, str, str, list[str]]:
    out, err = _Chunks(), io.StringIO()
    rc = chat.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue(), out.chunks


@pytest.mark.parametrize("kind,path,question,word", MEDIA_QUESTIONS, ids=[p for _, p, _, _ in MEDIA_QUESTIONS])
@pytest.mark.parametrize("ckpt", ["run", "export"])
def test_demo_answers_media_questions_through_chat(trained_demo, ckpt, kind, path, question, word):
    rc, out, err, chunks = _ask(["--ckpt", str(trained_demo / ckpt), f"--{kind}", str(trained_demo / path), question])
    assert rc == 0, err
    assert word in out.lower(), out
    assert len(chunks) >= 3, chunks  # streamed token by token, then the newline


def test_chat_command_line_and_interactive_history(trained_demo):
    # The real command, as a user types it (one question, native checkpoint, media path relative to the cwd).
    done = subprocess.run(
        [sys.executable, "-m", "omnicore.chat", "--ckpt", str(trained_demo / "run"), "--image", "media/blue.png", "What color is this picture?"],
        cwd=trained_demo, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "blue" in done.stdout.lower()
    # Interactive: one question per line until EOF; the image belongs to the first question.
    rc, out, err, _ = _ask(["--ckpt", str(trained_demo / "run"), "--image", str(trained_demo / "media/red.png")],
                           stdin="What color is this picture?\n\nWhat is two plus two?\n")  # fmt: skip
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "red" in lines[0].lower() and "four" in lines[1].lower(), lines


def test_chat_sampling_flags_are_reproducible(trained_demo):
    argv = ["--ckpt", str(trained_demo / "run"), "--temperature", "1.5", "--top-p", "0.98", "--max-new-tokens", "12", "Say hello."]
    first = _ask([*argv, "--seed", "3"])
    assert first[0] == 0 and first[1] == _ask([*argv, "--seed", "3"])[1]
    assert {_ask([*argv, "--seed", str(s)])[1] for s in range(4)} != {first[1]}  # the seed matters


def test_missing_media_is_a_clear_error(trained_demo):
    rc, out, err, _ = _ask(["--ckpt", str(trained_demo / "run"), "--image", str(trained_demo / "media/nope.png"), "What color?"])
    assert rc == 2 and out == ""
    assert "nope.png" in err and "missing" in err and "Traceback" not in err


def test_checkpoint_without_tokenizer_is_a_clear_error(trained_demo, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained_demo / "export", bare)
    (bare / "tokenizer.json").unlink()
    rc, _, err, _ = _ask(["--ckpt", str(bare), "Say hello."])
    assert rc == 2 and "has no tokenizer" in err and "--tokenizer" in err
    rc, out, err, _ = _ask(["--ckpt", str(bare), "--tokenizer", str(trained_demo / "model"), "Say hello."])  # the fix it names
    assert rc == 0 and "hello" in out.lower(), err


def test_over_long_prompt_is_a_clear_error(trained_demo, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(trained_demo / "export", small)
    config = json.loads((small / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 24
    (small / "config.json").write_text(json.dumps(config))
    rc, out, err, _ = _ask(["--ckpt", str(small), "Please tell me, what is two plus two? " * 3])
    assert rc == 2 and out == ""
    assert "exceeds the model's 24 positions" in err, err
    rc, out, _, _ = _ask(["--ckpt", str(small), "--max-new-tokens", "2", "Hi"])  # a short prompt still fits
    assert rc == 0


def test_eval_scores_the_demo_questions(trained_demo, tmp_path):
    records = [{"id": f"q{i}", "question": q, "answer": word, f"{kind}s": [path]} for i, (kind, path, q, word) in enumerate(MEDIA_QUESTIONS)]
    records.append({"id": "sum", "question": "What is two plus two?", "answer": ["Four.", "4"]})
    records.append({"id": "wrong", "question": "Say hello.", "answer": "goodbye"})
    records.append({"id": "lost", "question": "What color is this picture?", "answer": "red", "images": ["media/lost.png"]})
    data = trained_demo / "eval_questions.json"  # media paths are relative to the file's folder
    data.write_text(json.dumps(records))
    out, err = io.StringIO(), io.StringIO()
    rc = omni_eval.main(["--ckpt", str(trained_demo / "run"), "--data", str(data), "--batch-size", "3", "--output", str(tmp_path / "a.jsonl")],
                        stdout=out, stderr=err)  # fmt: skip
    assert rc == 0, err.getvalue()
    summary = json.loads(out.getvalue())
    assert summary == {"records": 7, "exact_match": pytest.approx(1 / 7), "accuracy": pytest.approx(5 / 7), "errors": 1}
    per = {r["id"]: r for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    assert all(per[f"q{i}"]["accuracy"] for i in range(4)) and per["sum"]["exact_match"]
    assert not per["wrong"]["accuracy"] and "lost.png" in per["lost"]["error"] and "lost.png" in err.getvalue()
    # Batching is only a speed-up: one prompt at a time gives the same answers.
    one = omni_eval.evaluate(chat.load_model(trained_demo / "run"), omni_eval.read_questions(data), data, batch_size=1)
    assert [r["answer"] for r in one] == [per[r["id"]]["answer"] for r in one]


def test_eval_question_file_errors_name_the_record(trained_demo, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "Hi", "answer": "Hello"}) + "\n" + json.dumps({"question": "Hi", "answr": "x"}) + "\n")
    err = io.StringIO()
    rc = omni_eval.main(["--ckpt", str(trained_demo / "run"), "--data", str(data)], stdout=io.StringIO(), stderr=err)
    assert rc == 2 and f"{data}:2" in err.getvalue() and "answr" in err.getvalue()
