"""The cost of safety, each as a ratio measured in one run against the unsafe reference, alternating.

1. Checkpoint save (`save_training`: sha256 of every file while writing, fsync per file, meta.json
   last, rename, tracker) of a wider thinker + its AdamW state + RNG, vs writing the very same bytes
   (same files, same sizes) with plain `open(..., "wb").write` + `os.fsync` per file + fsync of the
   folders. Also sha256 of those bytes alone (one thread), which explains most of the difference.
   Correctness: the saved checkpoint loads (sha256 verified) with equal weights, optimizer state,
   RNG and data position.
2. Checksums. (a) The checkpoint load's sha256 verification: `NativeCheckpoint(verify="used")` vs
   `verify="none"`, each followed by what a resume reads (all weights, optimizer and RNG state), page
   cache warm (the upper bound of the fraction: cold, both sides wait for the disk too).
   (b) The data cache's xxh3-64 check of every loaded sample: `SampleCache.load` has no switch, so
   the check itself (`omnicore.data.cache._add_to_checksum` on the loaded tensors, the same bytes) is
   timed against the load, and against one training step of the tiny model on the same samples.
3. The decode sandbox: processing the media records (decode + processor + template) in a worker
   process with the per-file timeout (`worker_map(workers=1, timeout=DECODE_TIMEOUT)`, what a cache
   build with workers runs) vs the same calls in this process (one torch thread on both sides, as
   in workers). Per-file overhead = (sandboxed - direct - pool start) / files; the pool's start is
   timed alone (a one-item map of a no-op).
4. Time to the first step: a one-step `omnicore_dist.run.run` of the tiny model resuming from a
   training checkpoint (weights, optimizer, RNG; sha256 verified) vs the same one-step run from the
   HF folder, each in a fresh process (imports counted alike), from launch to the end of the first
   `train_step`.

Ratios are reference time / candidate time (the speed of the safe path relative to the plain one);
benches/thresholds.toml [safety] holds the loose sanity gates, asserted in full runs only.

    python -m pytest benches/bench_safety.py -s -p no:cacheprovider                 # bench_results/safety_*.json
    python -m pytest benches/bench_safety.py -s -p no:cacheprovider --bench-quick   # correctness, a short timing (CI)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch
import xxhash

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "data"), str(ROOT / "tests"), str(ROOT / "tests" / "train"), str(ROOT / "examples")]

from common import gate, ratio_summary, thresholds, write_record  # noqa: E402
from data_files import write_image, write_json, write_video, write_wav  # noqa: E402
from tiny_tokenizer import write_tokenizer  # noqa: E402

import omnicore  # noqa: E402
from omnicore import TINY  # noqa: E402
from omnicore.checkpoint.commit import fsync_dir  # noqa: E402
from omnicore.checkpoint.native import NativeCheckpoint  # noqa: E402
from omnicore.config import TextConfig, ThinkerConfig  # noqa: E402
from omnicore.data import MLLM, ProcessorConfig, SampleContext, load_tokenizer, open_cache, process_sample, read_dataset  # noqa: E402
from omnicore.data.cache import DECODE_TIMEOUT, _add_to_checksum  # noqa: E402
from omnicore.data.collate import collate_packed  # noqa: E402
from omnicore.data.workers import worker_map  # noqa: E402
from omnicore.layout import Layout  # noqa: E402
from omnicore.ops import resolve  # noqa: E402
from omnicore_dist.checkpointing import SaveRequest, load_resume, rng_state, save_training  # noqa: E402
from omnicore_dist.mesh import Mesh  # noqa: E402
from omnicore_dist.optim import AdamW  # noqa: E402
from omnicore_dist.train import GradBuffer, train_step  # noqa: E402

MESH = Mesh(world=1, rank=0, dp=1, pp=1, tp=1)
LIMITS = thresholds("safety")


def _wide(vocab: int, hidden: int, layers: int, ffn: int) -> ThinkerConfig:
    """TINY's encoders under a wider text decoder (head_dim 128): the bytes of a checkpoint."""
    return attrs.evolve(
        TINY,
        text=TextConfig(vocab_size=vocab, hidden=hidden, n_layers=layers, n_heads=hidden // 128, n_kv_heads=2, ffn=ffn,
                        rope_theta=1e6, rms_eps=1e-6, mrope_section=(16, 24, 24)),
        vision=attrs.evolve(TINY.vision, out_hidden=hidden),
        audio=attrs.evolve(TINY.audio, output_dim=hidden),
    )  # fmt: skip


QUICK_CKPT = _wide(vocab=8192, hidden=1024, layers=1, ffn=2816)  # 28 M parameters: 0.11 GB weights + 0.22 GB AdamW state
FULL_CKPT = _wide(vocab=16384, hidden=1536, layers=4, ffn=4096)  # 150 M parameters (bench_train's MEDIUM): 0.6 + 1.2 GB


def _quick(request) -> bool:
    return bool(request.config.getoption("--bench-quick"))


def _alternate(candidates: dict, *, rounds: int, warmup: int = 1, cleanup=None) -> dict[str, list[float]]:
    """common.alternate, with an untimed `cleanup(name, result)` after each call (rounds that write
    gigabytes must not time the previous round's deletion)."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(-warmup, rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            result = candidates[name]()
            seconds = time.perf_counter() - start
            if r >= 0:
                times[name].append(seconds)
            if cleanup is not None:
                cleanup(name, result)
    return times


def _med(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f}, IQR {s['iqr']:.2f})"


# ---------------------------------------------------------------------------------------------
# 1 + 2a: checkpoint save vs plain writes, load verification


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """(cfg, params, optimizer, hf config file): a wider thinker after one AdamW step (non-zero state)."""
    cfg = QUICK_CKPT if _quick(request) else FULL_CKPT
    params = omnicore.init_thinker(cfg, seed=0, std=0.02)
    for name, p in params.items():
        p.requires_grad_(name != "audio.bos_eos.weight")
    opt = AdamW(params, lr=1e-4)
    opt.step({n: p.detach() * 1e-2 for n, p in params.items() if p.requires_grad})
    hf = tmp_path_factory.mktemp("ckpt_hf") / "config.json"
    hf.write_text(json.dumps(cfg.to_hf(), indent=2))
    return cfg, params, opt, hf


def _request(root: Path, trained, step: int) -> SaveRequest:
    cfg, params, opt, hf = trained
    return SaveRequest(root=root, step=step, cfg=cfg, hf_config=cfg.to_hf(), layout=Layout(), params=params,
                       optimizer=opt.state_dict, zero_sharded=False, save_rng=True,
                       data_state={"consumed_samples": 8 * step, "seed": 1234}, run_config="[model]\nload = 'hf'\n",
                       hf_files={"config.json": hf})  # fmt: skip


def _read_back(root: Path) -> list[tuple[str, bytes]]:
    """Every file a save left under `root` (step folder and tracker), relative name and bytes."""
    return [(str(p.relative_to(root)), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def _plain_write(files: list[tuple[str, bytes]], out: Path) -> Path:
    """The reference: the same bytes into the same files with plain Python writes, each file fsynced,
    then every folder."""
    folders = {out}
    out.mkdir(parents=True)
    for name, data in files:
        path = out / name
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_dir(folder)
    return out


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """A committed training checkpoint of `trained`, loaded back and checked (the correctness gate)."""
    cfg, params, opt, _ = trained
    root = tmp_path_factory.mktemp("ckpt") / "run"
    path = save_training(_request(root, trained, step=7), MESH)
    ckpt = NativeCheckpoint(root, verify="all")  # every file's size and sha256 against meta.json
    assert ckpt.path == path and ckpt.cfg == cfg
    got = ckpt.params()
    assert set(got) == set(params)
    for name, p in params.items():
        assert torch.equal(got[name], p.detach()), name
    resume = load_resume(ckpt, MESH, load_optim=True, load_rng=True)
    assert resume is not None and resume.step == 7 and not resume.inexact
    assert resume.data_state == {"consumed_samples": 56, "seed": 1234}
    state = resume.optimizer[0][0][0]
    want = opt.state_dict()
    assert set(state) == set(want)
    for key, value in want.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(resume.rng["torch_cpu"], rng_state()["torch_cpu"])
    return root


@pytest.mark.timeout(900)
def test_checkpoint_save_vs_plain_writes(trained, saved, bench_rounds, request, tmp_path):
    quick = _quick(request)
    files = _read_back(saved)
    total = sum(len(b) for _, b in files)
    rounds = bench_rounds if quick else max(3, bench_rounds // 3)
    made = iter(range(10**6))

    def save():
        return save_training(_request(tmp_path / f"save{next(made)}", trained, step=7), MESH).parent

    def plain():
        return _plain_write(files, tmp_path / f"plain{next(made)}")

    def sha256():
        return [hashlib.sha256(b).hexdigest() for _, b in files]

    def cleanup(name, result):
        if name != "sha256":
            shutil.rmtree(result)

    times = _alternate({"plain": plain, "save": save, "sha256": sha256}, rounds=rounds, cleanup=cleanup)
    speed = ratio_summary(times["plain"], times["save"])  # plain time / save time
    med = _med(times)
    record = {
        "files": len(files),
        "bytes": total,
        "model_parameters": sum(p.numel() for p in trained[1].values()),
        "seconds_median": med,
        "gb_per_s": {k: total / v / 1e9 for k, v in med.items()},
        "save_over_plain": {k: 1 / v for k, v in speed.items() if k != "iqr"},
        "plain_over_save": speed,
        "sha256_over_plain": statistics.median(s / p for s, p in zip(times["sha256"], times["plain"])),
        "rounds": rounds,
    }
    write_record("safety_save", record)
    print(f"\ncheckpoint save vs plain writes + fsync: {len(files)} files, {total / 1e9:.2f} GB "
          f"({record['model_parameters'] / 1e6:.0f} M parameters + AdamW state + RNG), {rounds} rounds")  # fmt: skip
    for k in ("plain", "save", "sha256"):
        print(f"  {k:<8} {med[k]:7.3f} s  {record['gb_per_s'][k]:6.2f} GB/s")
    print(f"  save time / plain time: median {1 / speed['median']:.2f}x (plain / save {_fmt(speed)}); "
          f"sha256 alone / plain: {record['sha256_over_plain']:.2f}")  # fmt: skip
    gate(speed, LIMITS["plain_over_save"], quick=quick, what="checkpoint save vs plain writes + fsync (plain / save)")


@pytest.mark.timeout(900)
def test_checkpoint_load_verification(saved, bench_rounds, request):
    quick = _quick(request)
    rounds = bench_rounds if quick else max(3, bench_rounds // 3)

    def load(verify: str):
        def call():
            ckpt = NativeCheckpoint(saved, verify=verify)
            return ckpt.params(), load_resume(ckpt, MESH, load_optim=True, load_rng=True)

        return call

    times = _alternate({"unverified": load("none"), "verified": load("used")}, rounds=rounds)
    speed = ratio_summary(times["unverified"], times["verified"])
    med = _med(times)
    fraction = statistics.median(1 - u / v for u, v in zip(times["unverified"], times["verified"]))
    record = {"seconds_median": med, "unverified_over_verified": speed, "verification_fraction_of_load": fraction, "rounds": rounds}
    write_record("safety_load_verify", record)
    print(f"\ncheckpoint load (weights + optimizer + RNG, page cache warm): verify='none' {med['unverified']:.3f} s, "
          f"verify='used' {med['verified']:.3f} s; sha256 verification = {fraction:.0%} of the verified load; "
          f"unverified / verified {_fmt(speed)}")  # fmt: skip
    gate(speed, LIMITS["unverified_over_verified_load"], quick=quick, what="checkpoint load, verify none / used")


# ---------------------------------------------------------------------------------------------
# 2b + 3: the data cache's checksums, the decode sandbox

IMAGES = [(240, 320), (480, 640), (240, 320), (480, 640)]
CLIPS = [2.0, 5.0]
VIDEOS = [(12, 4), (24, 8)]  # (frames, fps), 224 x 224 H.264
PASSES = 3  # the sandbox bench decodes every file this many times per call (24 decodes)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(conversations, context, tokenizer folder, dataset folder): 8 media files + 2 text-only records."""
    root = tmp_path_factory.mktemp("safety_media")
    records = []

    def turns(tag: str, k: int) -> list[dict]:
        return [{"role": "user", "content": f"{tag}Describe item {k}."}, {"role": "assistant", "content": f"Item {k} is a cat."}]

    for k, (h, w) in enumerate(IMAGES):
        write_image(root / f"img{k}.png", h, w, seed=k)
        records.append({"messages": turns("<image>", k), "images": [f"img{k}.png"]})
    for k, seconds in enumerate(CLIPS):
        write_wav(root / f"clip{k}.wav", seconds, seed=k)
        records.append({"messages": turns("<audio>", k), "audios": [f"clip{k}.wav"]})
    for k, (frames, fps) in enumerate(VIDEOS):
        write_video(root / f"video{k}.mp4", frames=frames, fps=fps)
        records.append({"messages": turns("<video>", k), "videos": [f"video{k}.mp4"]})
    records += [{"messages": turns("", k)} for k in range(2)]
    write_json(root / "data.json", records)
    model_dir = write_tokenizer(root / "tokenizer")
    convs, _ = read_dataset(root / "data.json", MLLM)
    ctx = SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY, processor=ProcessorConfig())
    return convs, ctx, model_dir, root


class _Process:
    """The sandboxed unit of work: one record, decoded and processed (fork carries it to the worker)."""

    def __init__(self, convs, ctx):
        self.convs, self.ctx = convs, ctx

    def __call__(self, index: int) -> dict:
        return process_sample(self.convs[index], self.ctx).to_dict()


class _Replay:
    """A worker task returning results made beforehand (inherited through fork), copied into fresh
    storage as a decode would make them: the pool's start plus shipping the tensors back, no decode."""

    def __init__(self, results: dict):
        self.results = results

    def __call__(self, index: int) -> dict:
        return {k: v.clone() for k, v in self.results[index].items()}


@contextlib.contextmanager
def _one_thread():
    """One torch thread, as in loader workers: on a shared 2-core machine two intra-op threads
    contending with other jobs turn a 0.5 s tiny-model step into 1 to 15 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(600)
def test_cache_checksum_cost(media, bench_rounds, request, tmp_path):
    quick = _quick(request)
    convs, ctx, model_dir, _ = media
    cache = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    n = len(cache)
    assert n == len(convs) and not cache.stats.bad
    loaded = [cache.load(i) for i in range(n)]
    nbytes = sum(t.numel() * t.element_size() for s in loaded for t in s.values())

    def checksums() -> list[int]:
        out = []
        for i, sample in enumerate(loaded):
            digest = xxhash.xxh3_64()
            for key in cache.entries[i].keys:
                _add_to_checksum(digest, key, sample[key])
            out.append(digest.intdigest())
        return out

    assert checksums() == [e.checksum for e in cache.entries]  # the very check `load` makes, on the same bytes
    repeat = 20  # a pass over the samples takes milliseconds: time `repeat` passes per call

    def load_all():
        for _ in range(repeat):
            for i in range(n):
                cache.load(i)

    def check_all():
        for _ in range(repeat):
            checksums()

    # One training step of the tiny model on the same samples, one packed micro-batch.
    params = omnicore.init_thinker(TINY, seed=0, std=0.02)
    trainable = {k: v.requires_grad_(True) for k, v in params.items() if k != "audio.bos_eos.weight"}
    opt, grads, ops = AdamW(trainable, lr=1e-4), GradBuffer(trainable), resolve("auto", "cpu")
    batch = collate_packed(loaded)

    def step():
        return train_step(params, grads, opt, TINY, [batch], lr=1e-4, mesh=MESH, ops=ops).loss

    rounds = bench_rounds
    with _one_thread():
        loss = step()
        assert loss == loss and loss > 0  # finite
        times = _alternate({"load": load_all, "checksum": check_all, "step": step}, rounds=rounds, warmup=1 if quick else 2)
    per_pass = {"load": statistics.median(times["load"]) / repeat, "checksum": statistics.median(times["checksum"]) / repeat,
                "step": statistics.median(times["step"])}  # fmt: skip
    of_load = statistics.median(c / ld for c, ld in zip(times["checksum"], times["load"]))
    of_step = statistics.median(c / repeat / s for c, s in zip(times["checksum"], times["step"]))
    # load with the check vs without it (estimated as load minus the check on the same bytes)
    speed = ratio_summary([ld - c for ld, c in zip(times["load"], times["checksum"])], times["load"])
    record = {
        "samples": n,
        "bytes": nbytes,
        "seconds_per_pass": per_pass,
        "checksum_gb_per_s": nbytes / per_pass["checksum"] / 1e9,
        "checksum_fraction_of_load": of_load,
        "checksum_fraction_of_tiny_step": of_step,
        "unchecked_over_checked_load": speed,
        "rounds": rounds,
        "repeat": repeat,
    }
    write_record("safety_checksums", record)
    print(f"\ndata cache, {n} samples ({nbytes / 1e6:.1f} MB of tensors) per pass: load {per_pass['load'] * 1e3:.2f} ms, "
          f"xxh3 check alone {per_pass['checksum'] * 1e3:.2f} ms ({record['checksum_gb_per_s']:.1f} GB/s) = {of_load:.0%} of the "
          f"load; tiny-model train step on the same samples {per_pass['step'] * 1e3:.0f} ms, check = {of_step:.2%} of it")  # fmt: skip
    gate(speed, LIMITS["unchecked_over_checked_cache_load"], quick=quick, what="cache load without / with the xxh3 check")
    cache.close()


@pytest.mark.timeout(600)
def test_decode_sandbox_overhead(media, bench_rounds, request, monkeypatch):
    quick = _quick(request)
    # As the recipe's environment (omnicore_dist.env): forked workers get no tokenizer thread pool
    # (and HF tokenizers prints no fork warning per pool).
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    convs, ctx, _, _ = media
    task = _Process(convs, ctx)
    media_records = [i for i, c in enumerate(convs) if c.images or c.audios or c.videos]
    items = media_records * PASSES  # a build maps every record through one pool: its start is paid once
    n = len(items)

    def direct():
        return [task(i) for i in items]

    def sandboxed():
        return list(worker_map(task, items, workers=1, timeout=DECODE_TIMEOUT))

    def pool():
        return list(worker_map(abs, [0], workers=1, timeout=DECODE_TIMEOUT))

    rounds = bench_rounds if quick else bench_rounds // 2 + 1
    with _one_thread():  # the workers' setting, on both sides
        want, got = direct(), sandboxed()
        assert len(got) == n
        for a, b in zip(want, got):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        replay = _Replay(dict(zip(items, want)))

        def transport():
            return list(worker_map(replay, items, workers=1, timeout=DECODE_TIMEOUT))

        times = _alternate({"direct": direct, "sandboxed": sandboxed, "pool": pool, "transport": transport}, rounds=rounds)
    speed = ratio_summary(times["direct"], times["sandboxed"])
    med = _med(times)
    rows = list(zip(times["direct"], times["sandboxed"], times["pool"], times["transport"]))
    per_file = statistics.median((s - d) / n for d, s, _, _ in rows)
    per_file_after_start = statistics.median((s - d - p) / n for d, s, p, _ in rows)
    shipping = statistics.median((t - p) / n for _, _, p, t in rows)
    nbytes = sum(t.numel() * t.element_size() for sample in want for t in sample.values())
    record = {
        "files": len(media_records),
        "decodes": n,
        "kinds": {"images": len(IMAGES), "audio": len(CLIPS), "videos": len(VIDEOS)},
        "result_bytes": nbytes,
        "seconds_median": med,
        "direct_over_sandboxed": speed,
        "overhead_ms_per_file": per_file * 1e3,
        "overhead_ms_per_file_after_pool_start": per_file_after_start * 1e3,
        "pool_start_ms": med["pool"] * 1e3,
        "shipping_results_ms_per_file": shipping * 1e3,
        "rounds": rounds,
    }
    write_record("safety_sandbox", record)
    print(f"\ndecode sandbox, {len(media_records)} media files x {PASSES} = {n} decodes ({nbytes / 1e6:.0f} MB of processed tensors), "
          f"{rounds} rounds, medians:\n"
          f"  in process {med['direct'] * 1e3:.0f} ms ({med['direct'] / n * 1e3:.1f} ms / file); worker process + timeout "
          f"{med['sandboxed'] * 1e3:.0f} ms; direct / sandboxed {_fmt(speed)}\n"
          f"  overhead {per_file * 1e3:.1f} ms / file = pool start {med['pool'] * 1e3:.0f} ms once + "
          f"{per_file_after_start * 1e3:.1f} ms / file, of which shipping the results back {shipping * 1e3:.1f} ms / file")  # fmt: skip
    gate(speed, LIMITS["direct_over_sandboxed_decode"], quick=quick, what="media decode in process / in the sandbox")


# ---------------------------------------------------------------------------------------------
# 4: time to the first step on resume

_RUN = r"""
import time
started = time.time()
import json, sys
from pathlib import Path
job = json.loads(sys.argv[1])
import omnicore_dist.run as run_module
from omnicore_dist.config import load_run_config
from train_worker import CONFIG, samples
imported = time.time()
marks, inner = {}, run_module.train_step
def first(*args, **kwargs):
    out = inner(*args, **kwargs)
    marks.setdefault("first_step", time.time())
    return out
run_module.train_step = first  # run() calls it by this module's name
base = Path(job["base"])
base.mkdir(parents=True, exist_ok=True)
(base / "run.toml").write_text(CONFIG.format(hf=job["load"], iters=3))
cfg = load_run_config(base / "run.toml", [])
marks["run"] = time.time()
summary = run_module.run(cfg, base=base, samples=samples(), stop_after=job["stop_after"])
Path(job["out"]).write_text(json.dumps({"started": started, "imported": imported, **marks, "end": time.time(), "step": summary["step"]}))
"""


def _launch(load: Path, base: Path, stop_after: int) -> dict:
    """One `run` in a fresh process: its timestamps (seconds since launch) and final step."""
    out = base.with_suffix(".json")
    paths = os.pathsep.join(str(ROOT / p) for p in ("tests", "tests/data", "tests/train", "examples"))  # as tests/train/dist_launch.py
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=paths)
    job = json.dumps({"load": str(load), "base": str(base), "stop_after": stop_after, "out": str(out)})
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", _RUN, job], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marks = json.loads(out.read_text())
    return {k: (v - launched if k != "step" else v) for k, v in marks.items()}


@pytest.mark.timeout(900)
def test_resume_time_to_first_step(bench_rounds, request, tmp_path):
    from quickstart import write_hf_folder
    from train_worker import CONFIG, samples

    from omnicore_dist.config import load_run_config
    from omnicore_dist.run import run

    quick = _quick(request)
    hf = tmp_path / "hf"
    write_hf_folder(hf, TINY, seed=0)
    prep = tmp_path / "prep"  # two steps, saved at step 2 (of 3), in this process
    prep.mkdir()
    (prep / "run.toml").write_text(CONFIG.format(hf=hf, iters=3))
    with _one_thread():  # as train_worker.py
        assert run(load_run_config(prep / "run.toml"), base=prep, samples=samples(), stop_after=2)["step"] == 2
    checkpoint = prep / "run"
    assert NativeCheckpoint(checkpoint).meta["iteration"] == 2
    made = iter(range(10**6))
    results: dict[str, list[dict]] = {"fresh": [], "resume": []}

    def fresh():
        results["fresh"].append(_launch(hf, tmp_path / f"fresh{next(made)}", stop_after=1))

    def resume():
        results["resume"].append(_launch(checkpoint, tmp_path / f"resume{next(made)}", stop_after=1))

    rounds = 1 if quick else max(3, bench_rounds // 3)
    _alternate({"fresh": fresh, "resume": resume}, rounds=rounds, warmup=0)
    assert all(r["step"] == 1 for r in results["fresh"]) and all(r["step"] == 3 for r in results["resume"])
    first = {k: [r["first_step"] for r in v] for k, v in results.items()}
    speed = ratio_summary(first["fresh"], first["resume"])
    marks = ("started", "imported", "run", "first_step", "end")
    phases = {k: {p: statistics.median(r[p] for r in v) for p in marks} for k, v in results.items()}
    in_run = {k: statistics.median(r["first_step"] - r["run"] for r in v) for k, v in results.items()}
    record = {"seconds_since_launch_median": phases, "run_to_first_step": in_run, "fresh_over_resume": speed, "rounds": rounds}
    write_record("safety_resume", record)
    print(f"\ntime to the first step (tiny model, fresh process, {rounds} rounds), seconds since launch (median):")
    for k in ("fresh", "resume"):
        p = phases[k]
        print(f"  {k:<7} imports done {p['imported']:5.2f}  run() entered {p['run']:5.2f}  first step done {p['first_step']:5.2f}  "
              f"(run() -> first step {in_run[k]:.2f})  exit {p['end']:5.2f}")  # fmt: skip
    print(f"  resume / fresh to the first step: {phases['resume']['first_step'] / phases['fresh']['first_step']:.2f}x "
          f"(fresh / resume {_fmt(speed)}); inside run(): {in_run['resume'] - in_run['fresh']:+.2f} s")  # fmt: skip
    gate(speed, LIMITS["fresh_over_resume_first_step"], quick=quick, what="time to the first step, fresh / resume")
