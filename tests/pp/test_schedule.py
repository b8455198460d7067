"""The pipeline schedules as pure event lists, and the payload header that lets micro-batches of any
length travel between stages."""

from __future__ import annotations

import pytest
import torch

from omnicore_dist.pipeline import PAYLOAD_NAMES, _header, _parse, schedule_events


def _in_flight(events):
    live = peak = 0
    for kind, _ in events:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def test_1f1b_warms_up_alternates_and_drains():
    f, b = (lambda i: ("F", i)), (lambda i: ("B", i))
    assert schedule_events("1f1b", 4, 0, 6) == [f(0), f(1), f(2), f(3), b(0), f(4), b(1), f(5), b(2), b(3), b(4), b(5)]
    assert schedule_events("1f1b", 4, 2, 6) == [f(0), f(1), b(0), f(2), b(1), f(3), b(2), f(4), b(3), f(5), b(4), b(5)]
    assert schedule_events("1f1b", 4, 3, 3) == [f(0), b(0), f(1), b(1), f(2), b(2)]  # the last stage never waits
    assert schedule_events("1f1b", 4, 0, 2) == [f(0), f(1), b(0), b(1)]  # fewer micro-batches than stages


@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 5), (4, 3), (4, 8), (8, 16)])
def test_every_micro_batch_once_and_1f1b_bounds_the_in_flight_activations(stages, micro):
    for stage in range(stages):
        for kind in ("1f1b", "gpipe"):
            events = schedule_events(kind, stages, stage, micro)
            assert sorted(events) == sorted([("F", i) for i in range(micro)] + [("B", i) for i in range(micro)])
            assert all(events.index(("F", i)) < events.index(("B", i)) for i in range(micro))
            assert [i for k, i in events if k == "B"] == list(range(micro))  # gradients accumulate in one order
        assert _in_flight(schedule_events("1f1b", stages, stage, micro)) == min(stages - stage, micro)
        assert _in_flight(schedule_events("gpipe", stages, stage, micro)) == micro


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="interleaved.*1f1b, gpipe"):
        schedule_events("interleaved", 2, 0, 4)


def test_header_round_trips_names_dtypes_shapes_and_gradient_flags():
    payload = {
        "hidden": torch.zeros(37, 64, dtype=torch.bfloat16, requires_grad=True),
        "positions": torch.zeros(3, 37, dtype=torch.int64),
        "cu_seqlens": torch.zeros(4, dtype=torch.int32),
        "image_values": torch.zeros(0, 1176),
        "audio_sizes": torch.zeros(2, 1, dtype=torch.int64),
    }
    parsed = _parse(_header(payload, "cpu"))
    assert parsed == [(k, v.dtype, v.requires_grad, tuple(v.shape)) for k, v in payload.items()]
    with pytest.raises(ValueError, match="5 dimensions"):
        _header({"hidden": torch.zeros(1, 1, 1, 1, 1)}, "cpu")
    assert len(set(PAYLOAD_NAMES)) == len(PAYLOAD_NAMES)


def test_a_sent_output_is_freed_and_still_backpropagates():
    """What a stage sent is not kept: only its autograd history stays, which is all backward needs."""
    from torch.autograd.variable import Variable

    from omnicore_dist.pipeline import _free

    x, w = torch.randn(64, 32), torch.randn(32, 16, requires_grad=True)
    out = torch.tanh(x @ w)  # tanh saves its output: only the history's own copy must survive
    expected_input = out.detach().clone()
    g = torch.randn(64, 16)
    _free(out)
    assert out.numel() == 1  # 64 x 16 values released
    Variable._execution_engine.run_backward((out,), (g,), False, False, (), True, True)
    assert torch.allclose(w.grad, x.T @ (g * (1 - expected_input**2)), rtol=1e-5, atol=1e-6)
