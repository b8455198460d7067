"""`python -m omnicore_dist.launch [torchrun flags] CONFIG.toml [--section.key=value ...] [--dry-run]`

One process needs no torchrun. Several (`--nproc-per-node N`, `--nnodes M`, or the recipe's
`NPUS_PER_NODE` / `NNODES` / `NODE_RANK` / `MASTER_ADDR` / `MASTER_PORT` environment) re-run this
module under `torch.distributed.run`, whose rendezvous also serves multi-node jobs and whose
`--max-restarts` restarts a failed job (the run then continues from the newest checkpoint in its
run folder, omnicore_dist.run.continue_in_run_folder). On NPU hosts the recipe's
recommended environment is applied for every variable the user has not set (omnicore_dist.env).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "parse_args", "torchrun_command"]

_ENV_DEFAULTS = {  # the recipe's shell variables, used when the flag is not given
    "nproc_per_node": "NPUS_PER_NODE",
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}


def parse_args(argv: Sequence[str], env: os._Environ | dict = os.environ) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m omnicore_dist.launch",
        description="Fine-tune the Qwen2.5-Omni thinker from one TOML run config.",
        epilog="Overrides: --section.key=value, e.g. --train.lr=2e-5 --checkpoint.save=runs/a (TOML values).",
    )
    for flag in ("nproc-per-node", "nnodes", "node-rank", "master-addr", "master-port", "max-restarts"):
        dest = flag.replace("-", "_")
        parser.add_argument(f"--{flag}", f"--{dest}", dest=dest, default=None)
    parser.add_argument("--dry-run", action="store_true", help="validate config, data and layout; print the plan; train nothing")
    parser.add_argument("config", help="the run config (TOML)")
    args, overrides = parser.parse_known_args(list(argv))
    for dest, var in _ENV_DEFAULTS.items():
        if getattr(args, dest) is None and env.get(var):
            setattr(args, dest, env[var])
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides are --section.key=value")
    return args, overrides


def _world(args: argparse.Namespace) -> int:
    return int(args.nproc_per_node or 1) * int(args.nnodes or 1)


def torchrun_command(args: argparse.Namespace, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torch.distributed.run command line that starts this module on every rank."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node or 1}", f"--nnodes={args.nnodes or 1}"]
    if int(args.nnodes or 1) > 1:
        cmd += [f"--node-rank={args.node_rank or 0}"]
    cmd += [f"--master-addr={args.master_addr or '127.0.0.1'}", f"--master-port={args.master_port or 29500}"]
    if args.max_restarts:
        cmd += [f"--max-restarts={args.max_restarts}"]
    cmd += ["-m", "omnicore_dist.launch", args.config, *overrides]
    return cmd + (["--dry-run"] if args.dry_run else [])


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from omnicore_dist.env import accelerator, npu_env_defaults

    if accelerator() == "npu":
        os.environ.update(npu_env_defaults(os.environ))
    under_torchrun = "LOCAL_RANK" in os.environ
    if _world(args) > 1 and not under_torchrun:
        import subprocess

        return subprocess.call(torchrun_command(args, overrides))
    from omnicore_dist.run import run_from_file

    return run_from_file(args.config, overrides, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
