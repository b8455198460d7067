"""Files omnicore reads are data, never code. Live pickles (unpickling one creates a marker file)
planted where it reads: a checkpoint's optimizer, RNG and weight files, `.bin` / `.pt` weights and
the talker's `spk_dict.pt`; a Jinja chat template that would run a shell command. Each is refused
(naming the file) or copied as bytes, and no marker ever appears."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from small_run import small_run

from omnicore.checkpoint.hf import CheckpointError, load_hf
from omnicore_dist.run import RUN_ERRORS

ROOT = Path(__file__).resolve().parents[2]


class _Marker:
    """Unpickling this calls open(path, "w"): the file appearing means code from a file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _live_pickle(marker: Path) -> bytes:
    data = pickle.dumps(_Marker(marker))
    probe = marker.with_name("probe")  # the plant is live: unpickling it really writes a file
    pickle.loads(pickle.dumps(_Marker(probe)))
    assert probe.exists()
    probe.unlink()
    return data


@pytest.fixture(scope="module")
def trained(tiny_hf, samples, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    small_run(base, tiny_hf, 1, samples)
    return base / "run"


@pytest.mark.parametrize("planted", ["optim-tp00-pp00.safetensors", "rng-tp00-pp00-dp00.safetensors", "text-tp00-pp00.safetensors"])
def test_a_pickle_in_a_checkpoint_is_refused_naming_the_file(trained, samples, tmp_path, planted):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    marker = tmp_path / "pwned"
    (run_dir / "iter_0000001" / planted).write_bytes(_live_pickle(marker))
    with pytest.raises(RUN_ERRORS, match=planted):
        small_run(tmp_path, run_dir, 2, samples)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_never_loaded(tiny_hf, tmp_path, name):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(tiny_hf / "config.json", folder)
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(_live_pickle(marker))
    with pytest.raises(CheckpointError, match=f"{name}: pickle files are never loaded"):
        load_hf(folder)
    assert not marker.exists()


def test_spk_dict_is_copied_as_bytes_through_training_and_export(tiny_hf, samples, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    marker = tmp_path / "pwned"
    (hf / "spk_dict.pt").write_bytes(_live_pickle(marker))
    small_run(tmp_path, hf, 1, samples, [f"--checkpoint.export_hf={tmp_path / 'export'}"])
    assert (tmp_path / "export" / "spk_dict.pt").read_bytes() == (hf / "spk_dict.pt").read_bytes()
    assert not marker.exists()


def test_a_chat_template_in_the_tokenizer_config_is_never_rendered(tmp_path):
    """The demo model with a template that would run `touch MARKER`: processing data and chatting
    use omnicore's own template code, so the marker never appears."""
    jinja2 = pytest.importorskip("jinja2")
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_demo.py"), "--out", str(demo)], check=True, timeout=120)
    marker = tmp_path / "pwned"
    template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    probe = tmp_path / "probe"  # the template is live: rendering it really runs the command
    jinja2.Template(template.replace(str(marker), str(probe))).render()
    assert probe.exists()
    config_file = demo / "model" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"chat_template": template}))
    asked = subprocess.run([sys.executable, "-m", "omnicore.chat", "--ckpt", str(demo / "model"), "--max-new-tokens", "4",
                            "--image", str(next((demo / "media").glob("*.png"))), "What color is this picture?"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    small_run(demo, demo / "model", 1, None, [f"--data.config={demo / 'data.json'}", "--data.seq_length=256"])
    assert not marker.exists()
