"""LoRA in the training runtime: which tensors train, how their gradients reduce, what is saved.

With `[lora] targets` set, the base weights (`model.load`, kept in `model.dtype`) are frozen and
only the fp32 adapters of omnicore.lora train: the GradBuffer and the optimizer hold nothing else,
so optimizer memory is the adapters'. The model sees `adapted(base, adapters)`, built once.
Tensor parallelism: each rank keeps its adapter pieces (omnicore.lora.adapter_rule); the
replicated half of a split layer gets a partial gradient, summed over the TP group once per step
with the other partial gradients (GradRole.partial); no collective is added to forward / backward.
A hetero-parallel encoder's adapters follow its own TP size, like its weights (`lora_grad_roles`).
Checkpoints hold only the adapters (+ optimizer, RNG, data position) and record their base's path
and sha256 (omnicore.checkpoint.lora_io); continuing (`lora.load`, or a restarted run whose folder
holds adapter checkpoints) checks that `model.load` is that base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

from omnicore.checkpoint.commit import read_tracker
from omnicore.checkpoint.lora_io import AdapterCheckpoint, base_fingerprint, check_base, export_merged_hf, write_peft_adapter
from omnicore.config import ThinkerConfig
from omnicore.layout import shard_tensor, tower_of, unshard_tensors
from omnicore.lora import LoraError, LoraSpec, adapted, adapter_rule, init_adapters, replicated_half
from omnicore.models.thinker import tp_plans
from omnicore.params import Params
from omnicore_dist.config import ConfigError, RunConfig
from omnicore_dist.mesh import Mesh
from omnicore_dist.tp import GradRole, split_role, tower_sizes

__all__ = ["LoraRun", "lora_spec", "setup_lora", "continue_lora_run", "lora_grad_roles"]


def lora_spec(cfg: RunConfig) -> LoraSpec:
    s = cfg.lora
    try:
        return LoraSpec(targets=s.targets, r=s.r, alpha=s.alpha, dropout=s.dropout, rslora=s.rslora, towers=s.towers)
    except LoraError as err:
        raise ConfigError(str(err)) from None


def lora_grad_roles(cfg: ThinkerConfig, names, size: int, tower_tp: Mapping[str, int] | None = None) -> dict[str, GradRole]:
    """Each adapter tensor's TP gradient role: a split half is this rank's own slice (copies 1, or
    kv-head copies like its base), a replicated half is a partial sum held on every rank.

    A hetero encoder (TP size E below the group's T, `tower_tp`) has T / E replicas, each seeing its
    share of the media: its adapters' gradients are also partial over the replicas. A replicated
    half, partial over its E ranks too, is summed over the whole TP group at once (E ranks x T / E
    replicas); a split half over its replicas (`replicas`, omnicore_dist.hetero)."""
    plans, sizes = tp_plans(cfg), tower_sizes(size, tower_tp)
    roles = {}
    for n in names:
        e = sizes[tower_of(n)]
        role = split_role(adapter_rule(n, plans), e)
        if replicated_half(n, plans):  # its adapter rule is None: held whole by each of the E ranks
            role = attrs.evolve(role, partial=e > 1)
        if e < size:
            replicas = size // e
            role = attrs.evolve(role, copies=role.copies * replicas, replicas=1 if role.partial else replicas)
        roles[n] = role
    return roles


@attrs.define
class LoraRun:
    """This rank's adapters (fp32 leaves that train), their spec, the base they belong to and the
    adapter checkpoint the run continues from (None: fresh adapters)."""

    spec: LoraSpec
    adapters: Params
    base: dict
    checkpoint: AdapterCheckpoint | None
    sizes: Mapping[str, int] = attrs.field(factory=dict)  # TP size per tower where it differs from the LLM's (hetero)

    def view(self, params: Params, *, train: bool) -> Params:
        return adapted(params, self.adapters, self.spec, train=train)

    def split_rule(self, cfg: ThinkerConfig):
        """name -> Split of an adapter tensor (or of its optimizer moments, which have its shape)."""
        plans = tp_plans(cfg)
        return lambda name: adapter_rule(name, plans)

    def meta(self) -> dict:
        return {"lora": {"spec": self.spec.to_json(), "base": self.base}}

    def full(self, cfg: ThinkerConfig, mesh: Mesh) -> Params:
        """Every rank's pieces joined into full adapters (collective over the TP group; with
        pipeline stages, every stage's adapters end up on the main rank). A hetero encoder's
        pieces are joined from its first replica's ranks."""
        out = {k: v.detach() for k, v in self.adapters.items()}
        if mesh.tp > 1:
            plans = tp_plans(cfg)
            for name, piece in self.adapters.items():
                parts = [torch.empty_like(piece) for _ in range(mesh.tp)]
                dist.all_gather(parts, piece.detach().contiguous(), group=mesh.tp_group)
                out[name] = unshard_tensors(parts[: self.sizes.get(tower_of(name), mesh.tp)], adapter_rule(name, plans), name)
        if mesh.pp > 1:
            stages: list = [None] * mesh.pp
            dist.all_gather_object(stages, {k: v.cpu() for k, v in out.items()}, group=mesh.pp_group)
            out = {k: v for stage in stages for k, v in stage.items()}
        return out

    def export(self, cfg: RunConfig, base: Path, loaded, mesh: Mesh, log) -> None:
        """The end-of-run exports: `lora.export_peft` (PEFT folder) and `checkpoint.export_hf`
        (adapters merged into the base, a full HF folder). Collective; the main rank writes."""
        if not (cfg.lora.export_peft or cfg.checkpoint.export_hf):
            return
        full = {k: v.cpu() for k, v in self.full(loaded.cfg, mesh).items()}
        if not mesh.is_main:
            return
        if cfg.lora.export_peft:
            out = write_peft_adapter(_path(base, cfg.lora.export_peft), full, self.spec, base_model=self.base["path"])
            log.message(f"exported the adapters as a PEFT folder to {out}")
        if cfg.checkpoint.export_hf:
            if loaded.hf_dir is None:
                raise ConfigError("checkpoint.export_hf needs the original HF folder: set checkpoint.hf_dir")
            out = export_merged_hf(self.base["path"], loaded.hf_dir, full, self.spec, _path(base, cfg.checkpoint.export_hf), overwrite=True)
            log.message(f"exported the base with the adapters merged to {out}")


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _broadcast(value, mesh: Mesh):
    if mesh.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def setup_lora(cfg: RunConfig, base: Path, cfg_model: ThinkerConfig, mesh: Mesh, device: torch.device,
               tower_tp: Mapping[str, int] | None = None, keep: Callable[[str], bool] | None = None) -> LoraRun:  # fmt: skip
    """Spec, base fingerprint (hashed once, on the main rank) and this rank's adapter pieces:
    fresh (seeded with train.seed) or from `lora.load`, whose recorded base must be `model.load`.
    `keep` selects this pipeline stage's adapters (they are named after their layers). A hetero
    encoder's adapters are cut like its weights: piece tp_rank % E of its TP size E."""
    spec = lora_spec(cfg)
    sizes = tower_sizes(mesh.tp, tower_tp)
    base_path = _path(base, cfg.model.load)
    fingerprint = _broadcast(base_fingerprint(base_path) if mesh.is_main else None, mesh)
    ckpt = None
    try:
        if cfg.lora.load:
            ckpt = AdapterCheckpoint(_path(base, cfg.lora.load))
            if ckpt.base["sha256"] != fingerprint["sha256"]:
                check_base(ckpt, base_path)  # raises, naming both
            if ckpt.spec != spec:
                raise LoraError(f"lora settings differ from those {ckpt.path} was trained with: {ckpt.spec.to_json()} (run: {spec.to_json()})")
            full = ckpt.params()
        else:
            full = init_adapters(cfg_model, spec, seed=cfg.train.seed)
    except LoraError as err:
        raise ConfigError(str(err)) from None
    plans = tp_plans(cfg_model)
    local = {}
    for name, t in full.items():
        if keep is not None and not keep(name):
            continue
        size = sizes[tower_of(name)]
        piece = shard_tensor(t, adapter_rule(name, plans), mesh.tp_rank % size, size, name)
        local[name] = piece.to(device=device, dtype=torch.float32).contiguous().clone().requires_grad_()
    return LoraRun(spec=spec, adapters=local, base=fingerprint, checkpoint=ckpt, sizes=sizes)


def continue_lora_run(cfg: RunConfig, base: Path, run_dir: Path) -> RunConfig:
    """A LoRA run whose folder already holds adapter checkpoints continues from the newest
    (`lora.load` = the run folder); `model.load` stays the base. `checkpoint.resume = "never"`
    makes that an error instead."""
    if read_tracker(run_dir) is None:
        return cfg
    if cfg.checkpoint.resume == "never":
        raise ConfigError(f"checkpoint.save {run_dir} already holds checkpoints: set checkpoint.resume = \"auto\" to continue, or save elsewhere")
    return attrs.evolve(cfg, lora=attrs.evolve(cfg.lora, load=str(run_dir)))
