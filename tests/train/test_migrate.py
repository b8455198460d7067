"""`python -m omnicore_dist.migrate`: every row of the mapping table through a minimal recipe, the
shipped examples regenerate from the recipe fixtures, errors name what is wrong, nothing is executed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from omnicore_dist.config import RunConfig, load_run_config
from omnicore_dist.migrate import Context, Migration, convert, main, migrate_files, parse_script, render_toml
from omnicore_dist.recipe_map import ROWS, Row, lookup

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tests/fixtures/recipe"
HF_FILE = ROOT / "tests/fixtures/hf_configs/qwen2_5_omni_7b.json"
HF7B = json.loads(HF_FILE.read_text())
BASE_DATA = {"dataset_param": {"dataset_type": "huggingface", "preprocess_parameters": {}, "basic_parameters": {"dataset": "data/train.json"}}}
BASE_FLAGS = {"--load": "--load base", "--train-iters": "--train-iters 10"}


def script(*, flags=(), exports=(), variables=(), runner=(), before=(), after=(), pipe="", base=True) -> str:
    """A minimal launch script in the recipe's shape."""
    flags = [*(v for k, v in BASE_FLAGS.items() if base and not any(f.split()[0] == k for f in flags)), *flags]
    body = " \\\n    ".join(flags)
    return "\n".join([
        "#!/bin/bash", *before, *(f"export {e}" for e in exports), *variables,
        f'GPT_ARGS="\n    {body}\n"',
        f"torchrun {' '.join(runner)} pretrain_vlm.py $GPT_ARGS{pipe}", *after,
    ]) + "\n"  # fmt: skip


def nested(base: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(base)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def data_with(name: str, value: Any) -> dict:
    head = name.split(".")[0]
    return nested(BASE_DATA, f"dataset_param.{name}" if head in ("preprocess_parameters", "basic_parameters", "attr") else name, value)


def migrate(tmp_path: Path, text: str, model: dict | None = None, data: dict | None = None, hf: dict | None = HF7B) -> tuple[Migration, Context]:
    ctx = Context(script_name="finetune.sh", model_name="model.json", data_name="data.json", data_config="data.json",
                  cwd=tmp_path, out_dir=tmp_path, hf_origin="config.json under test")  # fmt: skip
    return convert(parse_script(text), model or {}, data or BASE_DATA, hf=hf, ctx=ctx), ctx


def loaded(tmp_path: Path, m: Migration, ctx: Context) -> RunConfig:
    """The rendered config, loaded the way the launcher loads it."""
    assert not m.errors, m.errors
    path = tmp_path / "run.toml"
    path.write_text(render_toml(m, ctx))
    return load_run_config(path)


def config_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


# Rows that set keys: (input value, expected keys, extra recipe context). Values differ from defaults.
KEY_CASES: dict[str, tuple[Any, dict[str, Any], dict]] = {
    "--tensor-model-parallel-size": ("2", {"parallel.tp": 2}, {}),
    "--micro-batch-size": ("2", {"data.micro_batch_size": 2}, {}),
    "--global-batch-size": ("64", {"data.global_batch_size": 64}, {}),
    "--seq-length": ("4096", {"data.seq_length": 4096}, {}),
    "--lr": ("2e-5", {"train.lr": 2e-5}, {}),
    "--lr-decay-style": ("linear", {"train.lr_decay_style": "linear"}, {}),
    "--weight-decay": ("0.1", {"train.weight_decay": 0.1}, {}),
    "--train-iters": ("77", {"train.train_iters": 77}, {}),
    "--eval-interval": ("100", {"eval.interval": 100}, {"data": {"basic_parameters.val_rate": 0.05}}),
    "--eval-iters": ("20", {"eval.iters": 20}, {}),
    "--lr-warmup-fraction": ("0.05", {"train.lr_warmup_fraction": 0.05}, {}),
    "--clip-grad": ("1.0", {"train.clip_grad": 1.0}, {}),
    "--adam-beta1": ("0.8", {"train.adam_beta1": 0.8}, {}),
    "--adam-beta2": ("0.95", {"train.adam_beta2": 0.95}, {}),
    "--seed": ("7", {"train.seed": 7, "data.seed": 7}, {}),
    "--use-distributed-optimizer": (None, {"parallel.distributed_optimizer": True}, {}),
    "--sequence-parallel": (None, {"parallel.sequence_parallel": True}, {}),
    "--distributed-timeout-minutes": ("45", {"parallel.timeout_minutes": 45.0}, {}),
    "--load": ("some/ckpt", {"model.load": "some/ckpt"}, {}),
    "--lora-target-modules": ("linear_qkv linear_proj", {"lora.targets": ("linear_qkv", "linear_proj")}, {}),
    "--lora-r": ("8", {"lora.r": 8}, {}),
    "--lora-alpha": ("16", {"lora.alpha": 16.0}, {}),
    "--lora-dropout": ("0.05", {"lora.dropout": 0.05}, {}),
    "--load-base-model": ("ckpt/base", {"model.load": "ckpt/base", "lora.load": "base"}, {}),  # --load (BASE_FLAGS) is the adapters
    "--no-load-optim": (None, {"checkpoint.load_optim": False}, {}),
    "--no-load-rng": (None, {"checkpoint.load_rng": False}, {}),
    "--no-save-optim": (None, {"checkpoint.save_optim": False}, {}),
    "--no-save-rng": (None, {"checkpoint.save_rng": False}, {}),
    "--num-workers": ("3", {"data.num_workers": 3}, {}),
    "--mm-data": ("elsewhere/data_7b.json", {"data.config": "data.json"}, {}),
    "--log-interval": ("5", {"log.interval": 5}, {}),
    "--save-interval": ("50", {"checkpoint.save_interval": 50}, {}),
    "--save": ("runs/a", {"checkpoint.save": "runs/a"}, {}),
    "--calculate-per-sample-loss": (None, {"train.loss_reduction": "sample"}, {}),
    "--calculate-per-token-loss": (None, {"train.loss_reduction": "token"}, {}),
    "--min-lr": ("1e-7", {"train.min_lr": 1e-7}, {}),
    "--lr-warmup-iters": ("30", {"train.lr_warmup_iters": 30}, {}),
    "--adam-eps": ("1e-6", {"train.adam_eps": 1e-6}, {}),
    "--recompute-granularity": ("full", {"model.recompute": {"llm": "full"}}, {"flags": ["--recompute-method uniform"]}),
    "--recompute-method": ("block", {"model.recompute": {"llm": 4}},
                           {"flags": ["--recompute-granularity full", "--recompute-num-layers 4"]}),
    "--recompute-num-layers": ("2", {"model.recompute": {"llm": 2}},
                               {"flags": ["--recompute-granularity full", "--recompute-method block"]}),
    f"{'image_encoder.vision_encoder'}.freeze": (True, {"model.freeze": ("vision",)}, {}),
    "image_encoder.vision_projector.freeze": (True, {"model.freeze": ("vision_merger",)}, {}),
    "audio_encoder.audio_encoder.freeze": (True, {"model.freeze": ("audio", "audio_proj")}, {}),
    "text_decoder.freeze": (True, {"model.freeze": ("llm",)}, {}),
    "image_encoder.vision_encoder.pipeline_num_layers": ([32, 0], {"parallel.vit_pp_layers": (32, 0)},
                                                          {"model": {"text_decoder.pipeline_num_layers": [11, 17]}}),
    "audio_encoder.audio_encoder.pipeline_num_layers": ([30, 2], {"parallel.audio_pp_layers": (30, 2)},
                                                         {"model": {"text_decoder.pipeline_num_layers": [0, 28]}}),
    "text_decoder.pipeline_num_layers": ([28], {"parallel.llm_pp_layers": (28,)}, {}),
    "image_encoder.tp": (2, {"parallel.vit_tp": 2}, {"flags": ["--hetero-parallel"]}),
    "audio_encoder.tp": (2, {"parallel.audio_tp": 2}, {"flags": ["--hetero-parallel"]}),
    "preprocess_parameters.model_name_or_path": ("hf/Qwen2.5-Omni-7B", {"checkpoint.hf_dir": "hf/Qwen2.5-Omni-7B"}, {}),
    "dataloader_param.shuffle": (False, {"data.shuffle": False}, {}),
}
for _tower, _prefix in (("vision", "image_encoder.vision_encoder"), ("audio", "audio_encoder.audio_encoder"), ("llm", "text_decoder")):
    KEY_CASES |= {
        f"{_prefix}.recompute_granularity": ("full", {"model.recompute": {_tower: "full"}}, {"model": {f"{_prefix}.recompute_method": "uniform"}}),
        f"{_prefix}.recompute_method": ("block", {"model.recompute": {_tower: 3}},
                                        {"model": {f"{_prefix}.recompute_granularity": "full", f"{_prefix}.recompute_num_layers": 3}}),
        f"{_prefix}.recompute_num_layers": (1, {"model.recompute": {_tower: "full"}},
                                            {"model": {f"{_prefix}.recompute_granularity": "full", f"{_prefix}.recompute_method": "uniform"}}),
    }  # fmt: skip
def _flat(obj: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        out |= _flat(value, name + ".") if isinstance(value, dict) else {name: value}
    return out


# data.json fields the data pipeline maps: the recipe's values, plus samples for the optional ones.
DATA_VALUES = {k.removeprefix("dataset_param.") if k.count(".") > 1 else k: v
               for k, v in _flat(json.loads((RECIPE / "data_7b.json").read_text())).items()}  # fmt: skip
DATA_VALUES |= {"preprocess_parameters.use_audio_in_video": True, "basic_parameters.overwrite_cache": True, "basic_parameters.packing": True,
                "basic_parameters.neat_packing": True, "basic_parameters.val_dataset": "data/val.json", "basic_parameters.val_max_samples": 5,
                "basic_parameters.val_rate": 0.1, "basic_parameters.max_samples": 100}  # fmt: skip
SAMPLES = {"HCCL_EXEC_TIMEOUT": "1800", "--hetero-encoder-mbs-scale": "4", "--virtual-pipeline-model-parallel-size": "2"}


def sample(row: Row) -> Any:
    if row.name in SAMPLES:
        return SAMPLES[row.name]
    if row.expect:
        return row.expect[0]
    return row.recipe if row.recipe is not None else "x"


def other(value: Any) -> Any:
    """A value unlike `value`, of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value[:-1], value[-1] + 1]
    if isinstance(value, str) and value.isdigit():
        return str(int(value) + 1)
    return "something_else" if value is not None else "x"


def recipe_with(row: Row, value: Any, extra: dict | None = None) -> tuple[str, dict, dict]:
    """(script, model.json, data.json) holding just this row's flag or field (plus `extra`)."""
    extra = extra or {}
    kw: dict[str, Any] = {"flags": list(extra.get("flags", ()))}
    model: dict = {}
    data = BASE_DATA
    if row.section == "flag":
        kw["flags"].insert(0, row.name if row.arity == 0 else f"{row.name} {value}")
    elif row.section == "env":
        kw["exports"] = [f"{row.name}={value}"]
    elif row.section == "var":
        kw["variables"] = [f"{row.name}={value}"]
    elif row.section == "launch":
        kw["runner"] = [f"{row.name} {value}"]
    elif row.section == "command":
        kw |= {"source": {"before": ["source /usr/local/Ascend/cann/set_env.sh"]}, "tee": {"pipe": " | tee logs/train.log"},
               "chmod": {"after": ["chmod 440 logs/train.log"]},
               "throughput report": {"after": ['echo "Elapsed Time Per iteration: $STEP_TIME"']}}.get(row.name, {})  # fmt: skip
    elif row.section == "model":
        model = nested(model, row.name, value)
    else:
        data = data_with(row.name, value)
    for path, v in extra.get("model", {}).items():
        model = nested(model, path, v)
    for path, v in extra.get("data", {}).items():
        data = nested(data, f"dataset_param.{path}", v)
    return script(**kw), model, data


def rows(*kinds: str, checked_against: str | None = None) -> list:
    """Rows of these kinds as pytest params; together the tests below cover every row of the table."""
    picked = [r for r in ROWS if r.kind in kinds]
    if checked_against == "config.json":
        picked = [r for r in picked if r.hf is not None]
    elif checked_against == "other":
        picked = [r for r in picked if r.hf is None]
    return [pytest.param(r, id=f"{r.section}:{r.name}") for r in picked]


@pytest.mark.parametrize("row", rows("key"))
def test_key_rows_set_their_keys(row, tmp_path):
    assert row.name in KEY_CASES, f"add an example for {row.name}"
    value, expected, extra = KEY_CASES[row.name]
    m, ctx = migrate(tmp_path, *recipe_with(row, value, extra))
    cfg = loaded(tmp_path, m, ctx)
    for key, want in expected.items():
        assert config_value(cfg, key) == want, key
        assert any(row.name in origin for origin in m.values[key][1]), f"{key}'s comment names {row.name}"


def test_eval_interval_without_validation_data_is_dropped_with_a_warning(tmp_path):
    row = lookup("flag", "--eval-interval")
    m, ctx = migrate(tmp_path, *recipe_with(row, "100"))
    assert "eval.interval" not in m.values
    assert any("--eval-interval" in w and "no validation split" in w for w in m.warnings)
    assert config_value(loaded(tmp_path, m, ctx), "eval.interval") == 0


@pytest.mark.parametrize("row", rows("checked", checked_against="config.json"))
def test_structural_rows_agree_with_config_json_or_fail_naming_both(row, tmp_path):
    as_written = str if row.section == "flag" else lambda v: v
    m, _ = migrate(tmp_path, *recipe_with(row, as_written(row.recipe)))
    assert not m.errors and row.name in m.checked
    bad = other(row.recipe)
    m, _ = migrate(tmp_path, *recipe_with(row, as_written(bad)))
    assert len(m.errors) == 1 and row.name in m.errors[0] and repr(bad) in m.errors[0], m.errors
    assert repr(row.recipe) in m.errors[0] or str(row.recipe) in m.errors[0]


@pytest.mark.parametrize("row", rows("checked", checked_against="other"))
def test_other_checked_rows_accept_only_the_supported_value(row, tmp_path):
    if row.section == "flag":  # --pipeline-model-parallel-size against the layer lists
        m, _ = migrate(tmp_path, *recipe_with(row, "3", {"model": {"text_decoder.pipeline_num_layers": [11, 17]}}))
        assert any(row.name in e and "3" in e and "[11, 17]" in e for e in m.errors), m.errors
        return
    m, _ = migrate(tmp_path, *recipe_with(row, row.expect[0]))
    assert not m.errors and row.name in m.checked
    m, _ = migrate(tmp_path, *recipe_with(row, other(row.expect[0])))
    assert any(row.name in e and row.why in e for e in m.errors), m.errors


@pytest.mark.parametrize("row", rows("data"))
def test_data_rows_stay_in_data_json(row, tmp_path):
    m, ctx = migrate(tmp_path, *recipe_with(row, DATA_VALUES[row.name]))
    assert row.name in m.notes["data"] and loaded(tmp_path, m, ctx).data.config == "data.json"


@pytest.mark.parametrize("row", rows("via"))
def test_shell_variables_are_read_through_their_flags(row, tmp_path):
    m, _ = migrate(tmp_path, *recipe_with(row, sample(row)))
    assert f"{row.name}: read through {row.target}" in m.notes["via"]


@pytest.mark.parametrize("row", rows("refused"))
def test_refused_rows_are_errors_with_the_reason(row, tmp_path):
    if row.expect:  # the one harmless value is accepted
        m, _ = migrate(tmp_path, *recipe_with(row, row.expect[0]))
        assert not m.errors and any(row.name in n and row.why in n for n in m.notes["not needed"])
    m, _ = migrate(tmp_path, *recipe_with(row, other(row.expect[0]) if row.expect else sample(row)))
    assert any(row.name in e and "refused" in e and row.why in e for e in m.errors), m.errors


@pytest.mark.parametrize("row", rows("not needed", "ignored"))
def test_not_needed_and_ignored_rows_say_why(row, tmp_path):
    m, ctx = migrate(tmp_path, *recipe_with(row, sample(row)))
    assert any(row.name in n and row.why in n for n in m.notes.get(row.kind, [])), m.notes
    loaded(tmp_path, m, ctx)
    if row.expect:  # a value other than the recipe's is worth a warning
        m, _ = migrate(tmp_path, *recipe_with(row, other(row.expect[0])))
        assert any(row.name in w and row.why in w for w in m.warnings), m.warnings


def test_the_tests_above_cover_every_row():
    covered = {p.values[0].name for kinds in (("key",), ("checked",), ("data",), ("via",), ("refused",),
                                              ("not needed", "ignored")) for p in rows(*kinds)}  # fmt: skip
    assert covered == {r.name for r in ROWS}


@pytest.mark.parametrize("variant", ["", "_hetero"])
def test_recipe_files_regenerate_the_shipped_examples(variant, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = "model_7b_hetero.json" if variant else "model_7b.json"
    out = Path(f"examples/qwen2_5_omni_7b{variant}.toml")
    text, m, _ = migrate_files(RECIPE.relative_to(ROOT) / f"finetune_qwen2_5_omni_7b{variant}.sh", RECIPE.relative_to(ROOT) / model,
                               RECIPE.relative_to(ROOT) / "data_7b.json", out, hf_dir=str(HF_FILE.relative_to(ROOT)))  # fmt: skip
    assert not m.errors and text == (ROOT / out).read_text(), "regenerate with the command in docs/migrate.md"
    assert len(m.checked) > 40 and not m.unchecked


def test_shipped_examples_load_with_the_recipe_layout():
    base = load_run_config(ROOT / "examples/qwen2_5_omni_7b.toml")
    parallel = base.parallel
    assert (parallel.tp, parallel.llm_pp_layers, parallel.vit_pp_layers, parallel.audio_pp_layers) == (1, (11, 17), (32, 0), (32, 0))
    assert base.model.freeze == ("vision", "vision_merger", "audio", "audio_proj")
    assert (base.data.micro_batch_size, base.data.global_batch_size, base.data.seq_length) == (1, 192, 3072)  # 1 x 48 x DP 4
    train = base.train
    assert (train.lr, train.lr_decay_style, train.lr_warmup_fraction, train.loss_reduction) == (1e-5, "cosine", 0.1, "micro_batch")
    assert base.parallel.distributed_optimizer and base.checkpoint.save_interval == 10000 and not base.checkpoint.save_optim
    hetero = load_run_config(ROOT / "examples/qwen2_5_omni_7b_hetero.toml")
    assert (hetero.parallel.tp, hetero.parallel.vit_tp, hetero.parallel.audio_tp, hetero.parallel.llm_pp_layers) == (4, 1, 1, (28,))
    assert (hetero.data.micro_batch_size, hetero.data.global_batch_size) == (4, 384)  # 4 x 48 x DP 2


def test_shell_arithmetic_continuations_and_substitution(tmp_path):
    text = script(exports=["TP=2"], variables=["NPUS_PER_NODE=4", "NNODES=2", "WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))", "PP=1",
                             "MBS=2", "GRAD_ACC=3", "DP=$(($WORLD_SIZE/$TP/$PP))", "GBS=$((MBS * GRAD_ACC * DP))"],
                  flags=["--tensor-model-parallel-size ${TP}", "--micro-batch-size $MBS", "--global-batch-size ${GBS}",
                         "--seq-length ${SEQ:-2048}"])  # fmt: skip
    m, ctx = migrate(tmp_path, text)
    cfg = loaded(tmp_path, m, ctx)
    assert (cfg.parallel.tp, cfg.data.micro_batch_size, cfg.data.global_batch_size, cfg.data.seq_length) == (2, 2, 24, 2048)
    assert "GBS=$((MBS * GRAD_ACC * DP))" in m.values["data.global_batch_size"][1][0]
    assert not m.warnings and "TP: read through --tensor-model-parallel-size" in m.notes["via"]


VARIANT = """#!/bin/bash
NPUS_PER_NODE=8; NNODES=1
DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \\
    --master_port=6000
"
GPT_ARGS="--load ckpt --train-iters=20 --lr 2e-5"
python -m torch.distributed.run $DISTRIBUTED_ARGS pretrain_vlm.py \\
    $GPT_ARGS --distributed-backend nccl 2>&1 | tee logs/train.log
STEP_TIME=`grep "elapsed time per iteration" logs/train.log | awk -F ':' '{print$5}' | awk '{s+=$1} END {print s/NR}'`
SAMPLES_PER_SECOND=`awk 'BEGIN{printf "%.3f\\n", '${GBS}'*1000/'${STEP_TIME}'}'`
"""


def test_other_script_forms_read_the_same(tmp_path):
    m, ctx = migrate(tmp_path, VARIANT)
    cfg = loaded(tmp_path, m, ctx)
    assert (cfg.train.train_iters, cfg.train.lr, cfg.model.load) == (20, 2e-5, "ckpt")
    assert m.launch == "python -m omnicore_dist.launch --nproc-per-node 8 --master-port 6000"
    assert "--train-iters 20" in m.values["train.train_iters"][1]
    assert not m.warnings and "throughput report" in " ".join(m.notes["not needed"])


def test_what_cannot_be_evaluated_is_explained(tmp_path):
    text = script(variables=["TP=1", "DP=$(($WORLD_SIZE/$TP))", "GBS=$((4*$DP))", "STAMP=$(date +%s)"],
                  flags=["--global-batch-size ${GBS}"])  # fmt: skip
    m, _ = migrate(tmp_path, text)
    assert any("--global-batch-size ${GBS}" in e and "WORLD_SIZE is not set" in e for e in m.errors), m.errors
    m, _ = migrate(tmp_path, script(variables=["STAMP=$(date +%s)"], flags=["--save runs/$STAMP"]))
    assert any("--save runs/$STAMP" in e and "command substitution $(date +%s)" in e for e in m.errors), m.errors
    m, _ = migrate(tmp_path, script(variables=["DP=$((8/0))"]))
    assert any("divides by zero" in w for w in m.warnings), m.warnings


def test_readme_style_comments_inside_the_argument_string_are_skipped(tmp_path):
    text = script(flags=["--no-load-optim \\ # 不加载优化器状态", "--lr 3e-5 # a note"])
    m, ctx = migrate(tmp_path, text)
    cfg = loaded(tmp_path, m, ctx)
    assert cfg.train.lr == 3e-5 and not cfg.checkpoint.load_optim
    assert any("GPT_ARGS" in w and "comment" in w for w in m.warnings)


def test_structural_contradiction_names_both_values(tmp_path):
    m, _ = migrate(tmp_path, script(), model={"text_decoder": {"num_layers": 27}})
    assert len(m.errors) == 1 and "text_decoder.num_layers = 27" in m.errors[0] and "num_hidden_layers = 28" in m.errors[0]


def test_without_config_json_the_check_is_skipped_and_said(tmp_path):
    m, ctx = migrate(tmp_path, script(), model={"text_decoder": {"num_layers": 27}}, hf=None)
    assert not m.errors and m.unchecked == ["text_decoder.num_layers"]
    assert any("structural check of 1 model.json fields skipped" in w for w in m.warnings)
    loaded(tmp_path, m, ctx)


def test_unknown_flags_fields_and_commands_are_reported(tmp_path):
    text = script(flags=["--my-flag 3 4", "--lr 1e-5"], exports=["MY_VAR=1"], before=["mkdir -p logs"])
    m, ctx = migrate(tmp_path, text, model={"text_decoder": {"num_layer": 28}})
    assert any("unknown flag --my-flag 3 4" in w for w in m.warnings), m.warnings
    assert any("MY_VAR" in w for w in m.warnings) and any("mkdir -p logs" in w for w in m.warnings)
    assert any("text_decoder.num_layer" in w and "did you mean text_decoder.num_layers" in w for w in m.warnings)
    assert loaded(tmp_path, m, ctx).train.lr == 1e-5
    m, _ = migrate(tmp_path, script(), data=data_with("basic_parameters.datset", "x.json"))
    assert any("basic_parameters.datset" in e and "did you mean" in e for e in m.errors), m.errors


def test_loss_reduction_default_and_conflict(tmp_path):
    m, ctx = migrate(tmp_path, script())
    assert loaded(tmp_path, m, ctx).train.loss_reduction == "micro_batch"
    m, _ = migrate(tmp_path, script(flags=["--calculate-per-token-loss", "--calculate-per-sample-loss"]))
    assert any("contradict" in e for e in m.errors)


def test_layout_and_batch_checks(tmp_path):
    model = {"text_decoder": {"pipeline_num_layers": [11, 17]}, "image_encoder": {"vision_encoder": {"pipeline_num_layers": [30, 2]}}}
    m, _ = migrate(tmp_path, script(flags=["--pipeline-model-parallel-size 2"]), model=model)
    assert any("vit_pp_layers [30, 2]" in e for e in m.errors), m.errors  # the encoder ends after the LLM starts
    runner = ["--nproc_per_node 8", "--nnodes 1"]
    m, _ = migrate(tmp_path, script(runner=runner, flags=["--micro-batch-size 1", "--global-batch-size 12", "--tensor-model-parallel-size 1"]))
    assert any("not divisible by --micro-batch-size 1 x data-parallel size 8" in e for e in m.errors), m.errors
    m, ctx = migrate(tmp_path, script(runner=runner, flags=["--tensor-model-parallel-size 2", "--micro-batch-size 3"]))
    assert m.launch == "python -m omnicore_dist.launch --nproc-per-node 8 --nnodes 1"
    assert loaded(tmp_path, m, ctx).data.global_batch_size == 12  # Megatron's default: micro batch x DP


def test_placeholder_id_is_not_needed_but_a_foreign_one_warns(tmp_path):
    for value in (151655, 151656):
        m, _ = migrate(tmp_path, script(), model={"img_context_token_id": value})
        assert not m.warnings and any("img_context_token_id" in n for n in m.notes["not needed"])
    m, _ = migrate(tmp_path, script(), model={"img_context_token_id": 12345})
    assert any("img_context_token_id = 12345" in w for w in m.warnings)


def test_the_script_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    text = script(before=[f"touch {marker}"], variables=[f"X=$(touch {marker}2)", f"Y=`touch {marker}3`"],
                  flags=[f"--save $(touch {marker}4)"], after=[f"touch {marker}5"])  # fmt: skip
    m, _ = migrate(tmp_path, text)
    assert not list(tmp_path.glob("marker*"))
    assert any("`touch" in w and "not interpreted" in w for w in m.warnings), m.warnings
    assert any("--save" in e and "command substitution" in e for e in m.errors), m.errors


def _write_recipe(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "finetune.sh").write_text(text)
    (tmp_path / "model.json").write_text(json.dumps({"text_decoder": {"num_layers": 28}}))
    (tmp_path / "data.json").write_text(json.dumps(BASE_DATA))
    return [str(tmp_path / n) for n in ("finetune.sh", "model.json", "data.json")]


def test_cli_writes_a_loadable_config_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the folder it is launched from
    files = _write_recipe(tmp_path, script())
    out = tmp_path / "out" / "run.toml"
    assert main([*files, "-o", str(out), "--hf-dir", str(HF_FILE)]) == 0
    assert load_run_config(out).model.load == "../base"  # rewritten relative to the output's folder
    printed = capsys.readouterr().out
    assert "mapped (" in printed and "not needed (" in printed and "warnings (" in printed and f"wrote {out}" in printed
    before = out.read_text()
    assert main([*files, "-o", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*files, "-o", str(out), "--overwrite"]) == 0
    assert not [p for p in out.parent.iterdir() if p.name != "run.toml"], "no temporary file left behind"


@pytest.mark.parametrize("layout,warned", [("hf", None), ("mindspeed", "is a MindSpeed-MM checkpoint"), ("missing", "does not exist here")])
def test_load_path_is_probed_for_mindspeed_checkpoints(layout, warned, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _write_recipe(tmp_path, script())
    if layout == "hf":
        (tmp_path / "base").mkdir()
        (tmp_path / "base/config.json").write_text("{}")
    elif layout == "mindspeed":
        (tmp_path / "base/release/mp_rank_00_000").mkdir(parents=True)
    _, m, _ = migrate_files(*map(Path, files), Path("run.toml"), hf_dir=str(HF_FILE))
    load_warnings = [w for w in m.warnings if w.startswith("model.load")]
    assert load_warnings == [] if warned is None else warned in load_warnings[0]


def test_cli_errors_name_the_file_and_write_nothing(tmp_path, capsys):
    files = _write_recipe(tmp_path, script())
    out = tmp_path / "run.toml"
    assert main([files[0], str(tmp_path / "missing.json"), files[2], "-o", str(out)]) == 2
    assert "missing.json: not found" in capsys.readouterr().err and not out.exists()
    (tmp_path / "model.json").write_text(json.dumps({"text_decoder": {"num_layers": 27}}))
    assert main([*files, "-o", str(out), "--hf-dir", str(HF_FILE)]) == 2
    assert "27" in capsys.readouterr().out and not out.exists()
    assert main([*files, "-o", str(out), "--hf-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no config.json" in capsys.readouterr().err
    (tmp_path / "finetune.sh").write_text('GPT_ARGS="--lr 1e-5\n')
    assert main([*files, "-o", str(out)]) == 2
    assert "line 1: unterminated \"" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("where", ["script folder", "working folder", "nowhere"])
def test_config_json_is_found_through_model_name_or_path(where, tmp_path, monkeypatch):
    recipe_dir, work = tmp_path / "recipe", tmp_path / "work"
    recipe_dir.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    files = _write_recipe(recipe_dir, script())
    (recipe_dir / "data.json").write_text(json.dumps(data_with("preprocess_parameters.model_name_or_path", "./hf/Omni")))
    if where != "nowhere":
        folder = (recipe_dir if where == "script folder" else work) / "hf/Omni"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(HF_FILE.read_text())
    text, m, _ = migrate_files(*map(Path, files), Path("run.toml"))
    if where == "nowhere":
        assert m.unchecked == ["text_decoder.num_layers"] and "no config.json at" in text
    else:
        assert m.checked[:1] == ["text_decoder.num_layers"] and "checked against" in text
