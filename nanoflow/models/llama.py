"""Llama-family decoder (Llama 2/3, Mistral, Qwen2): the kernels behind each op of
``llama_graph`` (input norm, QKV GEMM, RoPE + KV write, decode and prefill attention, O GEMM,
post-attention norm, gate-up GEMM, SiLU-mul, down GEMM, and the all-reduces of tensor
parallelism). The executor decides where and when each op runs.
"""

from __future__ import annotations

import torch

from nanoflow import kernels
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.kernels.fp8_linear import Fp8Weight
from nanoflow.models.rope import cos_sin_cache
from nanoflow.models.sharding import shard_weights
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.batch import NanoBatch, QuantizedRows, StepBuffers
from nanoflow.runtime.graph import LayerGraph, llama_graph
from nanoflow.runtime.ops import bind


class DecoderLayer:
    """One layer's (fused, possibly sharded) weights and KV cache, and a method per op of its
    graph (``llama_graph``) that runs the op's kernels."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos_sin: torch.Tensor,
        group: ParallelGroup,
    ) -> None:
        self.spec = spec
        self.w = weights
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.cos_sin = cos_sin
        self.group = group
        self.num_heads = spec.num_heads // group.size
        self.num_kv_heads = spec.num_kv_heads // group.size
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5

    def _fp8_input(self, weight: str, q: QuantizedRows | None) -> QuantizedRows | None:
        """The e4m3 buffer the GEMM of ``weight`` reads, when it is an FP8 GEMM and the step
        has one (else the GEMM quantizes its input itself)."""
        return q if isinstance(self.w.get(weight), Fp8Weight) else None

    def _gemm(
        self,
        weight: str,
        x: torch.Tensor,
        q: QuantizedRows | None,
        rows: slice,
        sms: int | None,
        out: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        if self._fp8_input(weight, q) is None:
            kernels.linear(x[rows], self.w[weight], bias, sms, out)
        else:
            kernels.linear(q.data[rows], self.w[weight], bias, sms, out, x_scale=q.scale[rows])

    def _norm(self, b: StepBuffers, rows: slice, weight: str, consumer: str) -> None:
        """Residual add + RMSNorm into ``normed``, or into its e4m3 copy when ``consumer``'s
        GEMM reads that."""
        args = (b.hidden[rows], self.w[weight], self.spec.rms_norm_eps, b.residual[rows])
        q = self._fp8_input(consumer, b.normed_q)
        if q is None:
            kernels.rms_norm(*args, b.normed[rows])
        else:
            kernels.rms_norm_quant(*args, q.data[rows], q.scale[rows])

    def input_norm(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        self._norm(b, slice(nb.start, nb.end), "input_norm", "qkv")

    def qkv_proj(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        self._gemm("qkv", b.normed, b.normed_q, rows, sms, b.qkv[rows], self.w.get("qkv_bias"))

    def _qkv_views(self, b: StepBuffers, rows: slice) -> tuple[torch.Tensor, ...]:
        qkv = b.qkv[rows]
        d = self.spec.head_dim
        q = qkv[:, : self.q_size].unflatten(1, (self.num_heads, d))
        k = qkv[:, self.q_size : self.q_size + self.kv_size].unflatten(1, (self.num_kv_heads, d))
        v = qkv[:, self.q_size + self.kv_size :].unflatten(1, (self.num_kv_heads, d))
        return q, k, v

    def rope_kv_write(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        q, k, v = self._qkv_views(b, rows)
        kernels.rope_kv_write(
            q,
            k,
            v,
            b.positions[rows],
            self.cos_sin,
            self.k_cache,
            self.v_cache,
            b.slot_mapping[rows],
        )

    def decode_attention(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        if nb.decode is None:
            return
        rows = slice(nb.start, nb.start + nb.num_decode)
        q, _, _ = self._qkv_views(b, rows)
        out = b.attn[rows].unflatten(1, (self.num_heads, self.spec.head_dim))
        kernels.paged_decode_attention(
            q,
            self.k_cache,
            self.v_cache,
            nb.decode.block_tables,
            nb.decode.context_lens,
            self.scale,
            sms,
            out,
        )

    def prefill_attention(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        if nb.prefill is None:
            return
        rows = slice(nb.start + nb.num_decode, nb.end)
        q, _, _ = self._qkv_views(b, rows)
        out = b.attn[rows].unflatten(1, (self.num_heads, self.spec.head_dim))
        p = nb.prefill
        kernels.paged_prefill_attention(
            q,
            self.k_cache,
            self.v_cache,
            p.block_tables,
            p.cu_q_lens,
            p.context_lens,
            p.max_q_len,
            self.scale,
            sms,
            out,
        )

    def o_proj(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        q = self._fp8_input("o", b.attn_q)
        if q is not None:  # decode and prefill attention write their rows separately
            kernels.quantize_fp8(b.attn[rows], q.data[rows], q.scale[rows])
        self._gemm("o", b.attn, b.attn_q, rows, sms, b.hidden[rows])

    def all_reduce(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        self.group.all_reduce(b.hidden[nb.start : nb.end])

    attn_all_reduce = mlp_all_reduce = all_reduce

    def post_attn_norm(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        self._norm(b, slice(nb.start, nb.end), "post_norm", "gate_up")

    def gate_up_proj(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        self._gemm("gate_up", b.normed, b.normed_q, rows, sms, b.gate_up[rows])

    def silu_mul(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        q = self._fp8_input("down", b.act_q)
        if q is None:
            kernels.silu_and_mul(b.gate_up[rows], b.act[rows])
        else:
            kernels.silu_and_mul_quant(b.gate_up[rows], q.data[rows], q.scale[rows])

    def down_proj(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        self._gemm("down", b.act, b.act_q, rows, sms, b.hidden[rows])


class LlamaModel:
    """Embedding, decoder layers as ops, final norm and LM head."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        group: ParallelGroup,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.group = group
        shard = shard_weights(group, spec, weights)
        self.embed_weight = shard.pop("embed")
        self.lm_head = shard.pop("lm_head")
        self.final_norm = shard.pop("final_norm")
        cache_shape = (num_blocks, spec.num_kv_heads // group.size, block_size, spec.head_dim)
        max_positions = spec.max_position_embeddings
        self.cos_sin = cos_sin_cache(spec, max_positions, device)
        self.layers = [
            DecoderLayer(
                spec,
                shard[i],
                torch.zeros(cache_shape, device=device, dtype=kv_dtype or dtype),
                torch.zeros(cache_shape, device=device, dtype=kv_dtype or dtype),
                self.cos_sin,
                group,
            )
            for i in range(spec.num_layers)
        ]
        self.graph: LayerGraph = llama_graph(tensor_parallel=group.size > 1)
        self.layer_ops = [bind(self.graph, layer) for layer in self.layers]

    def embed(self, input_ids: torch.Tensor, buffers: StepBuffers) -> None:
        n = input_ids.shape[0]
        self.group.embed(input_ids, self.embed_weight, out=buffers.hidden[:n])
        buffers.residual[:n].zero_()

    def logits(self, buffers: StepBuffers, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the given rows after the final residual add and norm."""
        hidden = buffers.hidden[rows]
        residual = buffers.residual[rows]
        normed = kernels.rms_norm(hidden, self.final_norm, self.spec.rms_norm_eps, residual)
        return self.group.lm_head(normed, self.lm_head).float()
