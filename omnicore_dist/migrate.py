"""`python -m omnicore_dist.migrate finetune.sh model.json data.json -o run.toml [--hf-dir DIR] [--overwrite]`

Turns a MindSpeed-MM Qwen2.5-Omni recipe (launch script, model.json, data.json) into an omnicore
run config. The script is read, never run: a small lexer takes its assignments, exports, `$((...))`
integer arithmetic, `${VAR}` substitution, backslash continuations and comments; anything that only
running the script could tell (`$(date)`) is reported where a carried value depends on it. Every flag
and field goes through its row of `omnicore_dist.recipe_map`; model.json's structural fields are
checked against the checkpoint's config.json. The output is written atomically and only after
`load_run_config` has accepted it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import tempfile
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from omnicore.data.config import DataConfigError, IgnoredFieldWarning, from_mindspeed
from omnicore.layout import LayoutError, stage_plan
from omnicore_dist.config import FREEZABLE, ConfigError, RunConfig, load_run_config
from omnicore_dist.env import npu_env_defaults
from omnicore_dist.recipe_map import ROWS, Row, hf_value, lookup
from omnicore_dist.recipe_shell import Script, ScriptError, Token, Var, NAME_PATTERN, parse_script

__all__ = ["ScriptError", "Token", "Var", "Script", "Context", "Migration", "parse_script", "convert", "render_toml",
           "summary_lines", "find_hf_config", "main"]  # fmt: skip


# The conversion: recipe rows -> run-config entries, notes, warnings, errors.

@attrs.frozen
class Context:
    """Where things are: names of the inputs as given, and the folders paths are rewritten between."""

    script_name: str
    model_name: str
    data_name: str
    data_config: str  # data.config: the data.json given, relative to the output folder
    cwd: Path  # the recipe's working folder (its relative paths start there)
    out_dir: Path  # relative paths in the output are relative to this folder
    hf_origin: str = ""  # where config.json came from, or why the structural check was skipped

    def rel(self, value: str) -> str:
        """A recipe path (relative to the working folder) rewritten relative to the output folder."""
        if not value or Path(value).expanduser().is_absolute():
            return value
        return Path(os.path.relpath(self.cwd / value, self.out_dir)).as_posix()


@attrs.define
class Migration:
    """The result: run-config values with their origins, and what the user must know."""

    values: dict[str, tuple[Any, list[str]]] = attrs.Factory(dict)
    mapped: list[str] = attrs.Factory(list)
    notes: dict[str, list[str]] = attrs.Factory(dict)  # kind -> "name: reason" lines
    warnings: list[str] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    checked: list[str] = attrs.Factory(list)  # structural fields that agree with config.json
    unchecked: list[str] = attrs.Factory(list)  # structural fields not checked (no config.json)
    launch: str = ""

    def set(self, key: str, value: Any, origin: str) -> None:
        if key in self.values:
            old, origins = self.values[key]
            if key == "model.freeze":
                value = tuple(dict.fromkeys((*old, *value)))
            elif key == "model.recompute":
                value = {**old, **value}
            elif not _same(old, value):
                self.warnings.append(f"{key}: {origins[-1]} gives {old!r}, {origin} gives {value!r}; the latter wins")
            self.values[key] = (value, [*origins, origin])
        else:
            self.values[key] = (value, [origin])
        self.mapped.append(f"{origin} -> {key} = {_toml(value)}")

    def note(self, kind: str, text: str) -> None:
        lines = self.notes.setdefault(kind, [])
        if text not in lines:
            lines.append(text)


def _same(a: Any, b: Any) -> bool:
    """Recipe / config equality: numbers by value (1e-6 == 1e-06), bools only equal bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _apply_keys(row: Row, value: Any, origin: str, m: Migration, ctx: Context) -> None:
    """A key row: its entries, path values rewritten; a bad value is an error on the row."""
    try:
        entries = row.keys(value)
    except ValueError as e:
        m.errors.append(f"{origin}: {e}")
        return
    for key, v in entries.items():
        m.set(key, ctx.rel(v) if row.path and isinstance(v, str) else v, origin)


def _check(row: Row, value: Any, origin: str, m: Migration, hf: Mapping | None, ctx: Context) -> None:
    """A structural value against config.json: agreement is counted, a contradiction names both."""
    if hf is None:
        m.unchecked.append(row.name)
        return
    try:
        expected = hf_value(row, hf)
    except (KeyError, TypeError):
        m.warnings.append(f"{origin}: {ctx.hf_origin} has no {row.target.removeprefix('config.json ')}; not checked")
        return
    if _same(value, expected):
        m.checked.append(row.name)
    else:
        m.errors.append(f"{origin} = {value!r} contradicts {row.target} = {expected!r} ({ctx.hf_origin}); "
                        "model structure comes only from config.json: fix or remove the field")  # fmt: skip


def _plain(row: Row, value: Any, shown: str, m: Migration) -> None:
    """not needed / ignored / refused / via rows: a note, a warning for an unexpected value, or an error."""
    expected = any(_same(value, e) for e in row.expect) if row.expect else row.kind != "refused"
    if row.kind == "refused" and not expected:
        m.errors.append(f"{shown}: refused: {row.why}")
    elif row.kind == "refused" or expected:
        m.note("not needed" if row.kind == "refused" else row.kind, f"{shown}: {row.why}")
    else:
        wanted = " or ".join(repr(e) for e in row.expect)
        m.warnings.append(f"{shown}: the recipe has {wanted}; omnicore ignores it: {row.why}")


@attrs.define
class _Facts:
    """What later checks need from the script (all optional)."""

    pp: int | None = None
    pp_origin: str = ""
    hetero: bool = False
    loss_flags: list[str] = attrs.Factory(list)
    recompute: dict[str, dict[str, tuple[Any, str]]] = attrs.Factory(dict)  # tower -> field -> (value, origin)
    mm_data: str = ""
    world: int | None = None


def _script_origin(flag: str, tokens: Sequence[Token], script: Script) -> str:
    raw = " ".join(t.raw for t in tokens)
    origin = f"{flag} {raw}".strip()
    m = re.fullmatch(rf"\$\{{?({NAME_PATTERN})\}}?", raw)
    var = script.variables.get(m.group(1)) if m else None
    return f"{origin}, {m.group(1)}={var.raw}" if var is not None and "$((" in var.raw else origin


def _split_flags(script: Script, m: Migration) -> Iterator[tuple[str, list[Token]]]:
    """(flag, value tokens) in order; unknown flags take the words up to the next flag."""
    tokens = list(script.args)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.value is None or not tok.value.startswith("--"):
            m.warnings.append(f"line {tok.line}: argument {tok.raw!r} follows no flag; not carried over")
            continue
        name, eq, inline = tok.value.partition("=")
        row = lookup("flag", name)
        arity = row.arity if row is not None else "+"
        values = [Token(tok.raw.removeprefix(name + "="), inline, tok.line)] if eq else []
        while not eq and i < len(tokens) and (arity == "+" or len(values) < arity):
            nxt = tokens[i]
            if nxt.value is not None and nxt.value.startswith("--"):
                break
            values.append(nxt)
            i += 1
        yield name, values


def _apply_flags(script: Script, m: Migration, hf: Mapping | None, ctx: Context, facts: _Facts) -> None:
    seen: dict[str, str] = {}
    flags = list(_split_flags(script, m))
    lora_base = any(flag == "--load-base-model" for flag, _ in flags)  # LoRA: --load then names the adapter checkpoint
    for flag, tokens in flags:
        row = lookup("flag", flag)
        origin = _script_origin(flag, tokens, script)
        if flag in seen:
            m.warnings.append(f"{flag} is given twice ({seen[flag]}, then {origin}); the last one wins, as in the recipe")
        seen[flag] = origin
        if row is None:
            near = difflib.get_close_matches(flag, [r.name for r in ROWS if r.section == "flag"], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            m.warnings.append(f"unknown flag {origin}{hint}: not in the recipe table; not carried over")
            continue
        unknown = next((t for t in tokens if t.value is None), None)
        if row.arity == 1 and not tokens:
            m.errors.append(f"{flag} has no value")
            continue
        if unknown is not None and row.kind in ("key", "checked"):
            m.errors.append(f"{origin}: {unknown.why}; the migration never runs the script: write the value out")
            continue
        texts = [t.value for t in tokens]
        shown = f"{flag} {' '.join(t if t is not None else '?' for t in texts)}".strip()
        try:
            value = None if row.arity == 0 else [row.parse(t) for t in texts] if row.arity == "+" else row.parse(texts[0])
        except ValueError:
            m.errors.append(f"{shown}: expected {'an integer' if row.parse is int else 'a number'}")
            continue
        if flag.startswith("--recompute-") and row.kind == "key":
            facts.recompute.setdefault("llm", {})[flag.removeprefix("--recompute-").replace("-", "_")] = (value, origin)
        elif flag == "--pipeline-model-parallel-size":
            facts.pp, facts.pp_origin = value, origin
        elif flag == "--mm-data":
            facts.mm_data = origin
        elif flag == "--load" and lora_base:
            m.set("lora.load", ctx.rel(value), f"{origin} (with --load-base-model it is the LoRA checkpoint to continue from)")
        elif row.kind == "key":
            _apply_keys(row, value, origin, m, ctx)
        elif row.kind == "checked":
            _check(row, value, origin, m, hf, ctx)
        else:
            _plain(row, texts[0] if row.arity == 1 else None, shown, m)
        facts.hetero |= flag == "--hetero-parallel"
        if flag.startswith("--calculate-per-"):
            facts.loss_flags.append(flag)


def _apply_script(script: Script, m: Migration, hf: Mapping | None, ctx: Context, facts: _Facts) -> None:
    """Variables, commands and the launch line of the script."""
    for name, var in script.variables.items():
        sections = ("env", "var") if var.exported else ("var", "env")
        row = lookup(sections[0], name) or lookup(sections[1], name)
        shown = f"{'export ' if var.exported else ''}{name}={var.value if var.value is not None else var.raw}"
        if var.comments:
            m.warnings.append(f"{name} (line {var.line}): `# ...` inside its quotes reaches the program as arguments in bash; "
                              "the migration skips it as a comment")  # fmt: skip
        if row is None and var.exported:
            m.warnings.append(f"{shown}: not in the recipe table; the run config carries no environment: export it before launching")
        elif row is not None and row.section == "env":
            _plain(row, var.value, shown, m)
            if name == "HCCL_CONNECT_TIMEOUT" and var.value is not None:
                try:
                    npu_env_defaults({name: var.value})
                except ValueError as e:
                    m.warnings.append(f"{shown}: the launcher will refuse it: {e}")
        elif row is not None:
            m.note("via", f"{name}: read through {row.target}")
        if var.value is None:
            m.warnings.append(f"not evaluated: {var.why}")
    for line, name, text in script.commands:
        row = lookup("command", name)
        if row is None:
            m.warnings.append(f"line {line}: `{text[:60]}` is not interpreted (the migration never runs the script); not carried over")
        else:
            _plain(row, None, name, m)
    if not script.launch_line:
        m.warnings.append(f"{ctx.script_name}: no torchrun line; no flags were read")
        return
    _plain(lookup("command", "torchrun"), None, "torchrun", m)
    if script.entry is not None and Path(script.entry.value or "").name == "pretrain_vlm.py":
        _plain(lookup("command", "pretrain_vlm.py"), None, "pretrain_vlm.py", m)
    elif script.entry is not None:
        m.warnings.append(f"line {script.launch_line}: the launch runs {script.entry.raw}, not the recipe's pretrain_vlm.py")
    _apply_runner(script, m, facts)
    _apply_flags(script, m, hf, ctx, facts)


def _apply_runner(script: Script, m: Migration, facts: _Facts) -> None:
    """torchrun's flags: notes, the equivalent launcher command, and the world size."""
    given: dict[str, str] = {}
    for name, value in script.runner:
        row = lookup("launch", name)
        if row is None:
            m.warnings.append(f"torchrun {name}: not in the recipe table; pass it to python -m omnicore_dist.launch if it supports it")
            continue
        _plain(row, None, f"torchrun {name} {value or '?'}", m)
        if value:
            given[row.name.lstrip("-").replace("_", "-")] = value
    nproc, nnodes = given.get("nproc-per-node"), given.get("nnodes", "1")
    if nproc and nproc.isdigit() and nnodes.isdigit():
        facts.world = int(nproc) * int(nnodes)
    order = ("nproc-per-node", "nnodes", "node-rank", "master-addr", "master-port")
    m.launch = " ".join(["python -m omnicore_dist.launch", *(f"--{k} {given[k]}" for k in order if k in given)])


_CONTAINERS = {"image_encoder", "audio_encoder", "text_decoder"} | {
    "image_encoder.vision_encoder", "image_encoder.vision_projector", "audio_encoder.audio_encoder"}  # fmt: skip
_TOWER_OF = {"image_encoder.vision_encoder": "vision", "audio_encoder.audio_encoder": "audio", "text_decoder": "llm"}


def _json_fields(obj: Mapping[str, Any], containers: set[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if path in containers and isinstance(value, Mapping):
            yield from _json_fields(value, containers, path + ".")
        else:
            yield path, value


def _unknown_field(file: str, path: str, section: str) -> str:
    near = difflib.get_close_matches(path, [r.name for r in ROWS if r.section == section], n=1)
    return f"{file} field {path}" + (f" (did you mean {near[0]}?)" if near else "")


def _apply_model(model: Mapping[str, Any], m: Migration, hf: Mapping | None, ctx: Context, facts: _Facts) -> None:
    for path, value in _json_fields(model, _CONTAINERS):
        row = lookup("model", path)
        origin = f"model.json {path}"
        if row is None:
            m.warnings.append(f"{_unknown_field('model.json', path, 'model')}: not in the recipe table; ignored")
        elif row.kind == "checked":
            _check(row, value, origin, m, hf, ctx)
        elif ".recompute_" in path:
            tower_path, _, field = path.rpartition(".recompute_")
            facts.recompute.setdefault(_TOWER_OF[tower_path], {})[field] = (value, origin)
        elif path in ("image_encoder.tp", "audio_encoder.tp") and not facts.hetero:
            m.note("not needed", f"{origin} = {value}: read only with --hetero-parallel; the encoder uses the LLM's TP")
        elif row.keys is not None:
            _apply_keys(row, value, f"{origin} with --hetero-parallel" if path.endswith(".tp") else origin, m, ctx)
        else:
            _plain(row, value, f"{origin} = {json.dumps(value)}", m)
            if path == "img_context_token_id" and hf is not None:
                _check_placeholder(value, hf, m)


def _check_placeholder(value: Any, hf: Mapping, m: Migration) -> None:
    thinker = hf.get("thinker_config", hf)
    ids = {thinker.get("image_token_index", thinker.get("image_token_id")), thinker.get("video_token_index", thinker.get("video_token_id"))}
    if value not in ids:
        m.warnings.append(f"model.json img_context_token_id = {value} is neither config.json's image nor video placeholder id "
                          f"({sorted(i for i in ids if i is not None)}); omnicore uses config.json's ids")  # fmt: skip


def _recompute(tower: str, fields: Mapping[str, tuple[Any, str]], m: Migration, facts: _Facts) -> None:
    """Megatron's three recompute settings of one tower as one model.recompute entry."""
    granularity, method, layers = (fields.get(k, (None, ""))[0] for k in ("granularity", "method", "num_layers"))
    origin = ", ".join(o for _, o in fields.values())
    if granularity is None:
        m.warnings.append(f"{origin}: no effect without a recompute granularity (as in Megatron); nothing set")
    elif granularity == "selective":
        m.warnings.append(f"{origin}: selective recomputation (core attention only) has no omnicore equivalent; nothing set")
    elif granularity != "full":
        m.errors.append(f"{origin}: recompute granularity {granularity!r} is not full or selective")
    elif method in (None, "uniform"):
        # Megatron's uniform method recomputes every layer (in groups of num_layers): "full" here.
        m.set("model.recompute", {tower: "full"}, origin)
    elif method == "block" and isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0:
        if tower == "llm" and (facts.pp or 1) > 1:
            m.warnings.append(f"{origin}: Megatron counts the {layers} block-recomputed layers per pipeline stage; "
                              "omnicore counts them from the tower's first layer")  # fmt: skip
        m.set("model.recompute", {tower: layers}, origin)
    else:
        m.errors.append(f"{origin}: recompute method {method!r} with num_layers {layers!r}: expected uniform, or block with a layer count")


def _data_fields(data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """data.json fields under the names of omnicore.data.config.FIELDS (collate_param opened up)."""
    sections = {"dataset_param", "dataloader_param", "dataset_param.preprocess_parameters", "dataset_param.basic_parameters",
                "dataset_param.attr", "dataloader_param.collate_param"}  # fmt: skip
    for path, value in _json_fields(data, sections):
        nested = path.startswith("dataset_param.") and path.count(".") > 1  # dataset_param.<section>.<field>
        yield (path.removeprefix("dataset_param.") if nested else path), value


def _apply_data(data: Mapping[str, Any], m: Migration, ctx: Context) -> None:
    errors = len(m.errors)
    for name, value in _data_fields(data):
        row = lookup("data", name)
        origin = f"data.json {name}"
        if row is None and name.startswith("dataloader_param.collate_param."):
            m.warnings.append(f"{origin}: not in the recipe table; collate_param has no effect in omnicore")
        elif row is None:
            m.errors.append(f"{_unknown_field('data.json', name, 'data')}: omnicore's data pipeline does not know it")
        elif row.kind == "data":
            m.note("data", name)
        elif row.kind == "key":
            _apply_keys(row, value, origin, m, ctx)
        elif row.kind == "checked" and not (any(_same(value, e) for e in row.expect) or value is None and name.startswith("attr.")):
            m.errors.append(f"{origin} = {json.dumps(value)} is not supported ({row.why}); use {json.dumps(row.expect[0])}")
        elif row.kind == "checked":
            m.checked.append(name)
        else:
            _plain(row, value, f"{origin} = {json.dumps(value)}", m)
    if len(m.errors) == errors:  # the data pipeline's own validation (types, value ranges)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IgnoredFieldWarning)
            try:
                from_mindspeed(data)
            except DataConfigError as e:
                m.errors.append(f"data.json: {e}")


def _finish(m: Migration, hf: Mapping | None, model: Mapping, ctx: Context, facts: _Facts) -> None:
    """Defaults the recipe implies, recompute, freeze order, and the layout / batch checks."""
    # data.json's own relative paths (dataset, cache_dir, ...) stay relative to the working folder, as in MindSpeed.
    m.set("data.config", ctx.data_config, f"{facts.mm_data or 'the data.json given'}; its own relative paths are read from the working folder")
    if len(facts.loss_flags) > 1:
        m.errors.append(f"{' and '.join(facts.loss_flags)} contradict each other: choose one loss reduction")
    elif not facts.loss_flags:
        m.set("train.loss_reduction", "micro_batch", "no --calculate-per-*-loss flag: Megatron's per-micro-batch mean")
    for tower, fields in facts.recompute.items():
        _recompute(tower, fields, m, facts)
    if "model.freeze" in m.values:
        parts, origins = m.values["model.freeze"]
        m.values["model.freeze"] = (tuple(p for p in FREEZABLE if p in parts), origins)
    for key, origin in (("model.load", "--load"), ("train.train_iters", "--train-iters")):
        if key not in m.values:
            m.errors.append(f"{ctx.script_name} has no {origin}, and {key} is required")
    _check_layout(m, hf, model, facts)
    if hf is None and m.unchecked:
        m.warnings.append(f"structural check of {len(m.unchecked)} model.json fields skipped: {ctx.hf_origin}")


def _value(m: Migration, key: str, default: Any) -> Any:
    return m.values[key][0] if key in m.values else default


def _check_layout(m: Migration, hf: Mapping | None, model: Mapping, facts: _Facts) -> None:
    """Stage count vs layer lists, the lists vs the tower depths, and the batch split."""
    llm = _value(m, "parallel.llm_pp_layers", None)
    pp = facts.pp if facts.pp is not None else len(llm or (1,))
    if llm is None and pp > 1:
        m.errors.append(f"{facts.pp_origin}: model.json text_decoder.pipeline_num_layers is missing; omnicore needs the layer lists")
    elif llm is not None and len(llm) != pp:
        m.errors.append(f"{facts.pp_origin or '--pipeline-model-parallel-size (default 1)'} contradicts model.json "
                        f"text_decoder.pipeline_num_layers {list(llm)} ({len(llm)} stages)")  # fmt: skip
    elif llm is not None:
        depths = _depths(hf, model)
        if depths is None:
            m.warnings.append("layer lists not checked against the tower depths (no config.json and no num_layers in model.json)")
        else:
            try:
                stage_plan(depths, llm, _value(m, "parallel.vit_pp_layers", None), _value(m, "parallel.audio_pp_layers", None))
            except LayoutError as e:
                m.errors.append(f"model.json pipeline_num_layers: {e}")
    tp, mbs = _value(m, "parallel.tp", 1), _value(m, "data.micro_batch_size", 1)
    if facts.world is None:
        return
    dp = facts.world // (tp * pp)
    if facts.world % (tp * pp):
        m.errors.append(f"world size {facts.world} is not divisible by tp {tp} x pp {pp}")
    elif "data.global_batch_size" not in m.values:  # Megatron's default global batch: one micro-batch per DP rank
        m.set("data.global_batch_size", mbs * dp, f"no --global-batch-size: micro batch {mbs} x data-parallel size {dp}, as in Megatron")
    elif _value(m, "data.global_batch_size", 1) % (mbs * dp):
        gbs = _value(m, "data.global_batch_size", 1)
        m.errors.append(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}")


def _depths(hf: Mapping | None, model: Mapping) -> dict[str, int] | None:
    if hf is not None:
        t = hf.get("thinker_config", hf)
        try:
            return {"text": t["text_config"]["num_hidden_layers"], "vision": t["vision_config"]["depth"],
                    "audio": t["audio_config"]["encoder_layers"]}  # fmt: skip
        except (KeyError, TypeError):
            return None
    try:
        return {"text": model["text_decoder"]["num_layers"], "vision": model["image_encoder"]["vision_encoder"]["num_layers"],
                "audio": model["audio_encoder"]["audio_encoder"]["num_layers"]}  # fmt: skip
    except (KeyError, TypeError):
        return None


def convert(script: Script, model: Mapping[str, Any], data: Mapping[str, Any], *, hf: Mapping | None, ctx: Context) -> Migration:
    """The whole mapping (pure): `hf` is the parsed config.json, or None when none was reachable."""
    m, facts = Migration(), _Facts()
    _apply_script(script, m, hf, ctx, facts)
    _apply_model(model, m, hf, ctx, facts)
    _apply_data(data, m, ctx)
    _drop_eval_without_validation(m, data)
    _finish(m, hf, model, ctx, facts)
    return m


def _drop_eval_without_validation(m: Migration, data: Mapping[str, Any]) -> None:
    """Megatron skips evaluation when there is no validation data, omnicore stops with an error: a
    recipe's --eval-interval is carried over only when data.json has a validation split or file."""
    dataset = data.get("dataset_param") if isinstance(data.get("dataset_param"), Mapping) else {}
    basic = dataset.get("basic_parameters") if isinstance(dataset.get("basic_parameters"), Mapping) else {}
    if "eval.interval" in m.values and not (basic.get("val_rate") or basic.get("val_dataset")):
        _, origins = m.values.pop("eval.interval")
        m.warnings.append(f"{origins[-1]}: data.json has no validation split or file (basic_parameters.val_rate / "
                          "val_dataset), so there is nothing to evaluate: eval.interval is left at 0, as Megatron skips it")  # fmt: skip


# Output: the TOML text and the terminal summary.

def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _comment(origins: Sequence[str]) -> str:
    return "; ".join(origins).replace("\n", " ")


def _schema() -> dict[str, list[str]]:
    """Section -> keys, in RunConfig's order."""
    hints = typing.get_type_hints(RunConfig)
    return {name: list(attrs.fields_dict(hints[name])) for name in attrs.fields_dict(RunConfig)}


def render_toml(m: Migration, ctx: Context) -> str:
    """The run config: a header naming the sources, each value with the recipe flag or field it came from."""
    lines = [
        "# omnicore run config migrated by `python -m omnicore_dist.migrate` from a MindSpeed-MM Qwen2.5-Omni recipe:",
        f"#   script:     {ctx.script_name}",
        f"#   model.json: {ctx.model_name}",
        f"#   data.json:  {ctx.data_name}",
        "# Model structure comes only from the checkpoint's config.json. model.json's structural fields:",
        f"# {ctx.hf_origin}.",
        "# Each comment names the recipe flag or field a value came from. Relative paths are relative to this",
        "# file's folder. Keys the recipe does not set keep omnicore's defaults.",
    ]
    schema = _schema()
    for section, keys in schema.items():
        body = [f"{k} = {_toml(m.values[f'{section}.{k}'][0])}  # {_comment(m.values[f'{section}.{k}'][1])}"
                for k in keys if f"{section}.{k}" in m.values]  # fmt: skip
        if body:
            lines += ["", f"[{section}]", *body]
    return "\n".join(lines) + "\n"


def summary_lines(m: Migration, ctx: Context, output: str = "run.toml") -> list[str]:
    """What was mapped, checked, left out and why; warnings; errors; the launch command."""
    out = [f"mapped ({len(m.mapped)}):", *(f"  {line}" for line in m.mapped)]
    out.append(f"structure: {ctx.hf_origin}")
    if m.checked:
        out.append(f"checked, in agreement ({len(m.checked)}): {', '.join(m.checked)}")
    if m.notes.get("data"):
        out.append(f"kept in data.json, read by the data pipeline through data.config ({len(m.notes['data'])}): {', '.join(m.notes['data'])}")
    if m.notes.get("via"):
        out.append(f"shell variables read through their flags ({len(m.notes['via'])}): " + ", ".join(n.split(":")[0] for n in m.notes["via"]))
    for kind in ("not needed", "ignored"):
        out += [f"{kind} ({len(m.notes.get(kind, []))}):", *(f"  {line}" for line in m.notes.get(kind, []))]
    out += [f"warnings ({len(m.warnings)}):", *(f"  {w}" for w in m.warnings)]
    if m.errors:
        out += [f"refused / errors ({len(m.errors)}), nothing written:", *(f"  {e}" for e in m.errors)]
    if m.launch:
        out.append(f"launch with: {m.launch} {output}")
    return out


# Files: reading the inputs, finding config.json, writing the output atomically.

def _read_json(path: Path, what: str) -> Mapping[str, Any]:
    """A JSON object from `path`; `what` names the file in errors as the user gave it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScriptError(f"{what}: not found") from None
    except json.JSONDecodeError as e:
        raise ScriptError(f"{what}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, Mapping):
        raise ScriptError(f"{what}: expected a JSON object")
    return data


def _shown(path: Path, cwd: Path) -> str:
    rel = os.path.relpath(path, cwd)
    return Path(rel).as_posix() if not rel.startswith("..") else str(path)


def find_hf_config(hf_dir: str | None, data: Mapping[str, Any], script_dir: Path, cwd: Path) -> tuple[Path | None, str]:
    """config.json from --hf-dir (a folder or the file), else from data.json's model_name_or_path
    (relative to the script's folder, then the working folder); (None, why) when unreachable."""
    if hf_dir is not None:
        path = Path(hf_dir)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ScriptError(f"--hf-dir {hf_dir}: no config.json there")
        return file, f"checked against {_shown(file.resolve(), cwd)}"
    pre = data.get("dataset_param", {}).get("preprocess_parameters", {}) if isinstance(data.get("dataset_param"), Mapping) else {}
    name = pre.get("model_name_or_path") if isinstance(pre, Mapping) else None
    if not isinstance(name, str):
        return None, "no config.json reachable (data.json has no model_name_or_path; pass --hf-dir)"
    candidates = [Path(name)] if Path(name).is_absolute() else [script_dir / name, cwd / name]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder / "config.json", f"checked against {_shown((folder / 'config.json').resolve(), cwd)}"
    tried = ", ".join(dict.fromkeys(_shown(c.resolve(), cwd) for c in candidates))
    return None, f"no config.json at {tried} (pass --hf-dir)"


def migrate_files(script: Path, model: Path, data: Path, out: Path, *, hf_dir: str | None = None,
                  cwd: Path | None = None) -> tuple[str, Migration, Context]:  # fmt: skip
    """Read the three files (and config.json) and convert; the TOML text is "" when there are errors."""
    cwd = (cwd or Path.cwd()).resolve()
    try:
        text = (cwd / script).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"script {script}: not found") from None
    model_json, data_json = _read_json(cwd / model, f"model.json {model}"), _read_json(cwd / data, f"data.json {data}")
    hf_file, hf_origin = find_hf_config(hf_dir, data_json, (cwd / script).resolve().parent, cwd)
    hf = _read_json(hf_file, f"config.json {hf_file}") if hf_file is not None else None
    out_dir = (cwd / out).resolve().parent
    ctx = Context(script_name=str(script), model_name=str(model), data_name=str(data), cwd=cwd, out_dir=out_dir, hf_origin=hf_origin,
                  data_config=Path(os.path.relpath((cwd / data).resolve(), out_dir)).as_posix())  # fmt: skip
    m = convert(parse_script(text), model_json, data_json, hf=hf, ctx=ctx)
    if "model.load" in m.values:
        m.warnings += _load_warnings(m.values["model.load"][0], out_dir)
    return ("" if m.errors else render_toml(m, ctx)), m, ctx


def _load_warnings(load: str, out_dir: Path) -> list[str]:
    """What model.load points at: an HF folder is fine; MindSpeed-MM's mp_rank_* folders are not."""
    path = out_dir / Path(load).expanduser()
    if (path / "config.json").is_file():
        return []
    if any(path.glob("mp_rank_*")) or any(path.glob("*/mp_rank_*")):
        return [f"model.load = {load!r} is a MindSpeed-MM checkpoint (mp_rank_* folders), which omnicore does not read: "
                "point it at the HF folder (omnicore needs no conversion step) or an omnicore-convert output"]  # fmt: skip
    if path.exists():
        return []
    return [f"model.load = {load!r} does not exist here; if it is an mm-convert output, point it at the HF folder instead: "
            "omnicore reads HF folders and its own checkpoints, not MindSpeed-MM's mp_rank_* folders"]  # fmt: skip


def _write_atomically(path: Path, text: str) -> None:
    """Write beside the target, check it loads as a run config, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        load_run_config(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omnicore_dist.migrate",
        description="Turn a MindSpeed-MM Qwen2.5-Omni recipe (launch script, model.json, data.json) into an omnicore run "
                    "config. The script is read, never run. docs/migrate.md lists what each flag and field becomes.",
    )  # fmt: skip
    parser.add_argument("script", type=Path, help="the recipe's launch script, e.g. finetune_qwen2_5_omni_7b.sh")
    parser.add_argument("model", type=Path, help="the recipe's model.json (--mm-model), e.g. model_7b.json")
    parser.add_argument("data", type=Path, help="the recipe's data.json (--mm-data), e.g. data_7b.json")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the run config to write (TOML)")
    parser.add_argument("--hf-dir", help="HF checkpoint folder (or its config.json) to check model.json against; "
                        "default: data.json's model_name_or_path")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        text, m, ctx = migrate_files(args.script, args.model, args.data, args.output, hf_dir=args.hf_dir)
    except ScriptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(m, ctx, str(args.output))))
    if m.errors:
        return 2
    try:
        _write_atomically(args.output, text)
    except ConfigError as e:  # a mapping bug: the tool promises a loadable config
        print(f"error: the migrated config does not load ({e}); please report it", file=sys.stderr)
        return 3
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
