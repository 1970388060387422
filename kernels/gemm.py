"""Linear layers under an SM budget: ``y = x @ w.T (+ bias)``."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from nanoflow.kernels._compat import as_rows, cdiv, check_num_ctas, jit, sm_count, tl


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: ``num_ctas`` (the SM budget) does not change the result."""
    if out is None:
        return torch.nn.functional.linear(x, weight, bias)
    torch.matmul(x, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


@functools.cache
def _zero_bias(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


def linear_cublas(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """cuBLAS through ``addmm``, the path that goes through cuBLASLt and so honours the SM
    carve-out an execution unit sets (``torch.mm`` ignores it). ``num_ctas`` is enforced by that
    carve-out or by a green context, not here."""
    if bias is None:
        bias = _zero_bias(weight.shape[0], x.dtype, x.device)
    if out is None:
        return torch.addmm(bias, x, weight.t())
    return torch.addmm(bias, x, weight.t(), out=out)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (config, relative throughput of one tile): bigger tiles reuse each load more.
_GPU_CONFIGS = (
    (GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3), 1.0),
    (GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=4), 0.9),
    (GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4), 0.8),
    (GemmConfig(64, 64, 64, 8, num_warps=4, num_stages=4), 0.65),
)


def gemm_config(m: int, n: int, device: torch.device, programs: int) -> GemmConfig:
    """The tile whose rounds of ``programs`` tiles finish first: big tiles are faster per FLOP
    but leave programs of the budget idle on small M. Small tiles on CPU so the interpreter
    covers the edges."""
    if device.type != "cuda":
        return GemmConfig(32, 32, 16, 2, num_warps=4, num_stages=1)

    def cost(entry: tuple[GemmConfig, float]) -> float:
        config, speed = entry
        rounds = cdiv(cdiv(m, config.block_m) * cdiv(n, config.block_n), programs)
        return rounds * config.block_m * config.block_n / speed

    return min(_GPU_CONFIGS, key=cost)[0]


@jit(do_not_specialize=("M",))
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Persistent: each program walks output tiles (grouped along M for L2 reuse of the weight)
    with a stride of the grid size, so the grid *is* the SM budget."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        first_m = tile // per_group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + tile % per_group % group_size
        pid_n = tile % per_group // group_size
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Wrapping rows/cols keeps loads in bounds without masks; the store is masked.
        rm_in = rm % M
        rn_in = rn % N
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_mask = rk[None, :] < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_mask, other=0.0)
                b = tl.load(w_ptrs, mask=k_mask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    programs: int,
    out: torch.Tensor,
    config: GemmConfig,
) -> torch.Tensor:
    x2, out2 = x.reshape(-1, x.shape[-1]), as_rows(out, weight.shape[0], "out")
    (m, k), n = x2.shape, weight.shape[0]
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    _linear_kernel[(min(tiles, programs),)](
        x2, weight, bias if bias is not None else weight, out2, m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        out2.stride(0), out2.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        NUM_STAGES=config.num_stages, num_warps=config.num_warps,
    )  # fmt: skip
    return out


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` on at most ``num_ctas`` persistent programs (default: every SM),
    for the overlapped pipeline where cuBLAS cannot be limited."""
    check_num_ctas(num_ctas)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x [..., K] and weight [N, K] do not match: {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if out is None:
        out = x.new_empty(*x.shape[:-1], n)
    if out.shape != (*x.shape[:-1], n):
        raise ValueError(f"out must be {(*x.shape[:-1], n)}, got {tuple(out.shape)}")
    if any(t.device != x.device for t in (weight, bias, out) if t is not None):
        raise ValueError("x, weight, bias and out must be on the same device")
    if out.numel() == 0:
        return out
    if x.shape[-1] == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    programs = num_ctas or sm_count(x.device)
    config = gemm_config(out.numel() // n, n, x.device, programs)
    return _launch_linear(x, weight, bias, programs, out, config)
