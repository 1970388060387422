"""The grouped-GEMM MoE path (bf16 and FP8 experts) against the references, its padded routing
layout, and the combine kernel under the Triton interpreter (fp32 and fp16 only: bf16 is wrong
in the interpreter). On CPU the grouped GEMMs are torch's own fallback and the e4m3 one is
emulated by exact dequantization, so what these tests pin down is the layout and the scaling.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from nanoflow import kernels
from nanoflow.kernels import moe, moe_grouped
from nanoflow.kernels.fp8_linear import Fp8Weight, quantize_rows, quantize_weight


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _routing(tokens: int, experts: int, top_k: int, skew: float) -> torch.Tensor:
    """Top-k distinct experts per token; ``skew`` > 0 crowds the low experts and starves the
    high ones (some get no token at all)."""
    scores = torch.rand(tokens, experts) + torch.linspace(skew, -skew, experts)
    return torch.topk(scores, top_k, dim=-1).indices


def _inputs(tokens, hidden, inter, experts, top_k, skew, dtype=torch.float32):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) * inter**-0.5).to(dtype)
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    return x, w13, w2, weights, _routing(tokens, experts, top_k, skew)


CASES = {  # tokens, hidden, intermediate, experts, top_k, skew
    "decode": (5, 64, 96, 8, 2, 0.0),
    "prefill_skewed": (70, 48, 80, 4, 2, 2.0),
    "top1_odd_sizes": (19, 40, 72, 3, 1, 0.0),
    "single_token": (1, 64, 64, 8, 2, 0.0),
    "starved_experts": (40, 32, 32, 8, 2, 3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_padded_route_places_every_pair_once_in_aligned_expert_segments(case: str) -> None:
    tokens, _, _, experts, top_k, skew = CASES[case]
    ids = _routing(tokens, experts, top_k, skew)
    route = moe_grouped.padded_route(ids, experts)
    ends = route.ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    assert bool((starts % moe_grouped.ALIGN == 0).all()) and int(ends[-1]) <= route.rows
    assert len(set(route.position.tolist())) == tokens * top_k
    flat = ids.reshape(-1)
    for pair, row in enumerate(route.position.tolist()):
        expert = int(flat[pair])
        assert int(starts[expert]) <= row < int(ends[expert])
        assert int(route.source[row]) == pair // top_k
    counts = torch.bincount(flat, minlength=experts)
    assert ((ends - starts) - counts).clamp(min=0).max() < moe_grouped.ALIGN


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_moe_matches_reference(case: str) -> None:
    x, w13, w2, weights, ids = _inputs(*CASES[case])
    want = moe.fused_moe_ref(x, w13, w2, weights, ids)
    out = torch.full_like(x, float("nan"))
    got = moe_grouped.fused_moe_grouped(x, w13, w2, weights, ids, None, out)
    assert got is out
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_combine_kernel_matches_reference(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    tokens, top_k, width = 13, 2, 200  # width not a power of two: a partial column block
    rows = torch.randn(tokens * top_k + 20, width, dtype=dtype)
    position = torch.randperm(rows.shape[0])[: tokens * top_k]
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    want = moe_grouped.combine_ref(rows, position, weights, torch.empty(tokens, width, dtype=dtype))
    out = torch.full((tokens, width), float("nan"), dtype=dtype)
    got = moe_grouped.combine_triton(rows, position, weights, out)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(got, want, **tol)


def _fp8_moe_by_expert(x, w13: Fp8Weight, w2: Fp8Weight, weights, ids) -> torch.Tensor:
    """FP8 semantics written plainly: per token and choice, the token quantized per row, its
    expert's gate-up, SiLU-and-mul quantized per row, down, weighted and summed."""
    inter = w2.shape[2]
    data, scale = quantize_rows(x)
    xq = data.float() * scale.unsqueeze(1)
    w13f, w2f = w13.dequantize(), w2.dequantize()
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate_up = (xq[t] @ w13f[e].t()).to(torch.bfloat16).float()
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            act_data, act_scale = quantize_rows(act.unsqueeze(0))
            down = (act_data.float() * act_scale.unsqueeze(1)) @ w2f[e].t()
            out[t] += weights[t, j] * down[0].to(torch.bfloat16).float()
    return out


@pytest.mark.parametrize("case", ["decode", "prefill_skewed", "starved_experts"])
def test_fp8_moe_matches_per_expert_semantics_and_stays_near_the_unquantized_moe(case: str) -> None:
    x, w13, w2, weights, ids = _inputs(*CASES[case])
    q13, q2 = quantize_weight(w13), quantize_weight(w2)
    assert q13.scale.shape == w13.shape[:2] and q2.scale.shape == w2.shape[:2]
    got = kernels.fused_moe(x, q13, q2, weights, ids)
    torch.testing.assert_close(
        got, _fp8_moe_by_expert(x, q13, q2, weights, ids), atol=2e-2, rtol=2e-2
    )
    unquantized = moe.fused_moe_ref(x, w13, w2, weights, ids)
    assert float((got - unquantized).norm() / unquantized.norm()) < 0.1


def test_stacked_fp8_weights_are_checked_and_dequantize_per_expert_channel() -> None:
    w = torch.randn(3, 8, 16)
    q = quantize_weight(w)
    torch.testing.assert_close(q.dequantize(), w, atol=0.0, rtol=0.07)
    with pytest.raises(ValueError, match="scale must be float32"):
        Fp8Weight(q.data, q.scale[:, :4])


def test_moe_backend_switch_is_checked() -> None:
    with pytest.raises(ValueError, match="MoE backend"):
        kernels.set_moe_backend("cutlass")
