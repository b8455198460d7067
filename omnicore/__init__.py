"""omnicore: the Qwen2.5-Omni thinker as pure functions over flat parameter dicts.

    import omnicore
    cfg, params = omnicore.load_hf("path/to/Qwen2.5-Omni-7B")       # HF folder -> (config, params)
    loss = omnicore.thinker_loss(params, cfg, batch)                 # batch uses HF processor keys
    logits = omnicore.thinker_logits(params, cfg, batch)

Single-process and free of torch.distributed; `omnicore_dist` applies parallel layouts on top.
"""

from omnicore import ops
from omnicore.checkpoint.hf import CheckpointError, load_hf
from omnicore.comm import LOCAL, Comm
from omnicore.config import TINY, ConfigError, ThinkerConfig, load_config
from omnicore.models.positions import PositionError
from omnicore.models.thinker import (
    ThinkerInputs,
    init_thinker,
    param_shapes,
    prepare_inputs,
    thinker_logits,
    thinker_loss,
)
from omnicore.params import Params, select

__version__ = "0.1.0"

__all__ = [
    "ops",
    "load_hf",
    "load_config",
    "CheckpointError",
    "ConfigError",
    "PositionError",
    "ThinkerConfig",
    "TINY",
    "Comm",
    "LOCAL",
    "Params",
    "select",
    "param_shapes",
    "init_thinker",
    "prepare_inputs",
    "ThinkerInputs",
    "thinker_logits",
    "thinker_loss",
]
