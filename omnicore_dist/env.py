"""`python -m omnicore_dist.env`: versions, the accelerator found, and the launcher's NPU environment.

`npu_env_defaults` is the recipe's recommended Ascend environment (MindSpeed-MM
finetune_qwen2_5_omni_7b.sh and its README), applied by the launcher for every variable the user has
not set. It is a pure function of the current environment, so it is tested without an NPU.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

import torch

__all__ = ["NPU_ENV", "npu_env_defaults", "accelerator", "report", "main"]

# name -> (value, why). Values are the recipe's unless noted.
NPU_ENV: dict[str, tuple[str, str]] = {
    "TASK_QUEUE_ENABLE": ("2", "asynchronous operator dispatch, level 2 (recipe)"),
    "CPU_AFFINITY_CONF": ("2", "bind host threads to the NPU's NUMA cores (recipe)"),
    "HCCL_CONNECT_TIMEOUT": ("1200", "seconds to establish collectives; CANN accepts 120-7200 (recipe)"),
    "COMBINED_ENABLE": ("1", "fuse non-contiguous copy chains (recipe)"),
    "ASCEND_SLOG_PRINT_TO_STDOUT": ("0", "CANN logs to files, not stdout (recipe)"),
    "ASCEND_GLOBAL_LOG_LEVEL": ("3", "CANN logs errors only (recipe)"),
    "NPU_ASD_ENABLE": ("0", "silent-data-corruption detection off (recipe)"),
    "ASCEND_LAUNCH_BLOCKING": ("0", "asynchronous kernel launches (recipe)"),
    "ACLNN_CACHE_LIMIT": ("100000", "operator cache entries kept (recipe)"),
    "PYTORCH_NPU_ALLOC_CONF": ("expandable_segments:True", "less fragmentation with variable lengths (recipe README)"),
    "MULTI_STREAM_MEMORY_REUSE": ("2", "reuse memory across streams (recipe README)"),
    "TOKENIZERS_PARALLELISM": ("false", "no tokenizer thread pools inside data workers (recipe README)"),
}
HCCL_TIMEOUT_RANGE = (120, 7200)


def npu_env_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `env` (never overriding one the user set); ValueError when the
    user's HCCL_CONNECT_TIMEOUT is outside CANN's allowed range."""
    if "HCCL_CONNECT_TIMEOUT" in env:
        value = env["HCCL_CONNECT_TIMEOUT"]
        lo, hi = HCCL_TIMEOUT_RANGE
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise ValueError(f"HCCL_CONNECT_TIMEOUT={value!r}: CANN accepts whole seconds in {lo}..{hi}")
    return {k: v for k, (v, _) in NPU_ENV.items() if k not in env}


def accelerator() -> str:
    """"npu", "cuda" or "cpu": what this process would train on."""
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():
            return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def report(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    from omnicore import __version__

    kind = accelerator()
    lines = [
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__}",
        f"omnicore {__version__}",
        f"accelerator: {kind}",
        f"cpu threads: {torch.get_num_threads()}",
    ]
    if kind == "cuda":
        lines += [f"cuda {torch.version.cuda}: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"]
    if kind == "npu" or importlib.util.find_spec("torch_npu") is not None:
        cann = env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_HOME_PATH")
        lines.append(f"CANN environment: {'set (' + cann + ')' if cann else 'NOT set: source /usr/local/Ascend/ascend-toolkit/set_env.sh'}")
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
