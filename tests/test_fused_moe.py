"""The fused MoE kernel (Triton interpreter on CPU) against its reference, and the expert sort.

fp32 and fp16 only (bf16 is wrong in the interpreter). Routings cover experts with no tokens,
one token, all tokens, and uneven loads; outputs are poisoned with NaN so a pass proves every
row was written.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from nanoflow import kernels
from nanoflow.kernels import moe


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _routing(tokens: int, experts: int, top_k: int, kind: str) -> torch.Tensor:
    """Top-k expert ids per token (distinct within a token) for a routing pattern."""
    if kind == "uniform":
        scores = torch.rand(tokens, experts)
    elif kind == "skewed":  # expert 0 gets every token, the last expert none
        scores = torch.rand(tokens, experts) + torch.linspace(2.0, -2.0, experts)
    elif kind == "one_token":  # expert 1 gets exactly one token, expert 2 none
        scores = torch.rand(tokens, experts)
        scores[:, 1:3] = -1.0
        scores[0, 1] = 9.0
    else:
        raise ValueError(kind)
    return torch.topk(scores, top_k, dim=-1).indices


def _inputs(tokens, hidden, inter, experts, top_k, kind, dtype):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) * inter**-0.5).to(dtype)
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    return x, w13, w2, weights, _routing(tokens, experts, top_k, kind)


CASES = {  # tokens, hidden, intermediate, experts, top_k, routing
    "decode_uniform": (5, 64, 96, 8, 2, "uniform"),
    "prefill_skewed": (70, 48, 80, 4, 2, "skewed"),
    "one_token_expert": (33, 64, 64, 6, 2, "one_token"),
    "top1_odd_sizes": (19, 40, 72, 3, 1, "uniform"),
    "single_token": (1, 64, 64, 8, 2, "uniform"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_matches_reference(case: str, dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = _inputs(*CASES[case], dtype)
    want = moe.fused_moe_ref(x, w13, w2, weights, ids)
    out = torch.full_like(x, float("nan"))
    got = moe.fused_moe_triton(x, w13, w2, weights, ids, None, out)
    assert got is out
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-3, "rtol": 1e-2}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("num_ctas", [1, 2, 5])
def test_cta_budget_gives_same_result(num_ctas: int) -> None:
    x, w13, w2, weights, ids = _inputs(29, 64, 64, 4, 2, "skewed", torch.float32)
    want = moe.fused_moe_triton(x, w13, w2, weights, ids)
    torch.testing.assert_close(moe.fused_moe_triton(x, w13, w2, weights, ids, num_ctas), want)


def test_gpu_tile_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The H100 tiles (BLOCK_N 128, BLOCK_K 64), with partial tiles in both directions."""
    monkeypatch.setattr(moe, "tile_nk", lambda device: (128, 64))
    x, w13, w2, weights, ids = _inputs(40, 96, 160, 4, 2, "uniform", torch.float32)
    want = moe.fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(moe.fused_moe_triton(x, w13, w2, weights, ids), want)


def test_dispatch_uses_reference_on_cpu_tensors() -> None:
    kernels.set_backend("auto")
    x, w13, w2, weights, ids = _inputs(6, 32, 32, 4, 2, "uniform", torch.float32)
    torch.testing.assert_close(
        kernels.fused_moe(x, w13, w2, weights, ids), moe.fused_moe_ref(x, w13, w2, weights, ids)
    )


def test_bad_shapes_are_refused() -> None:
    x, w13, w2, weights, ids = _inputs(4, 32, 32, 4, 2, "uniform", torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        moe.fused_moe_triton(x[:, :16], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="num_ctas"):
        moe.fused_moe_triton(x, w13, w2, weights, ids, 0)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_token"])
def test_sort_by_expert_round_trip(kind: str) -> None:
    """Segments hold exactly their expert's pairs, and scattering back restores pair order."""
    tokens, experts, top_k = 37, 6, 2
    ids = _routing(tokens, experts, top_k, kind)
    order, offsets = moe.sort_by_expert(ids, experts)
    flat = ids.reshape(-1)
    assert sorted(order.tolist()) == list(range(tokens * top_k))
    for e in range(experts):
        segment = order[offsets[e] : offsets[e + 1]]
        assert (flat[segment] == e).all()
        assert int((flat == e).sum()) == len(segment)
        assert segment.tolist() == sorted(segment.tolist())  # stable
    rows = torch.randn(tokens, 8)
    gathered = rows[order // top_k]
    back = torch.empty(tokens * top_k, 8)
    back[order] = gathered
    torch.testing.assert_close(back.view(tokens, top_k, 8)[:, 0], rows)


@pytest.mark.parametrize("block_m", [16, 64])
def test_expert_tiles_cover_every_pair_once(block_m: int) -> None:
    ids = _routing(50, 5, 2, "skewed")
    tiles = moe.expert_tiles(ids, 5, block_m)
    seen: list[int] = []
    for t in range(int(tiles.count)):
        start, end, expert = int(tiles.start[t]), int(tiles.end[t]), int(tiles.expert[t])
        rows = tiles.pairs[start : min(end, start + block_m)].long()
        assert 0 < len(rows) <= block_m
        assert (ids.reshape(-1)[rows] == expert).all()
        seen += rows.tolist()
    assert sorted(seen) == list(range(100))
    assert int(tiles.count) <= tiles.max_tiles
