"""The resume line names what any rank misses: a rank the saved layout lacked may miss state that
rank 0, which writes the log, has (3 processes, gloo, a timeout)."""

from __future__ import annotations

import json

import pytest
from dist_launch import launch

_WORKER = """
import json, sys
from pathlib import Path
from omnicore_dist.mesh import Mesh, close_distributed, init_distributed
from omnicore_dist.run import _every_rank
rank, world = init_distributed(1.0)
got = _every_rank([f"only rank {rank}", "every rank"] if rank else ["every rank"], Mesh(world=world, rank=rank, dp=world, pp=1, tp=1))
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(got))
close_distributed()  # a process group left open can abort the process at exit
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_ranks_missing_state_is_reported(tmp_path):
    launch(3, ["-c", _WORKER, str(tmp_path)], tmp_path / "logs", timeout=90)
    for rank in range(3):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["every rank", "only rank 1", "only rank 2"], rank
