"""The engine loop in its own process, so HTTP parsing and tokenizing never take the GIL from
kernel launches (docs/architecture.md, "Data flow").

Messages travel over two ZeroMQ pipes as pickled tuples. In: ``("add", id, token_ids, params)``,
``("abort", ids)``, ``("stats", query_id)``, ``("shutdown",)``. Out: ``("ready", info)``,
``("outputs", [RequestOutput], [iteration seconds])`` once per iteration that produced tokens,
``("rejected", id, message)`` for a request the engine refuses, ``("stats", query_id, dict)`` and
``("fatal", message)`` just before the process gives up.

Fault injection (tests): ``run_engine(..., faults=PromptFaults(prefix))`` makes a request whose
decoded prompt starts with that text raise inside ``EngineCore`` when its first token is
post-processed, so it takes the same per-request failure path a real error takes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import zmq

from nanoflow.config import EngineConfig
from nanoflow.engine.grammar import GrammarCompiler, constrain
from nanoflow.errors import RequestError

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 100


@dataclass(frozen=True)
class EngineInfo:
    """What the front end must know to validate requests without asking the engine."""

    max_model_len: int
    vocab_size: int
    num_blocks: int
    eos_token_ids: tuple[int, ...]
    executor: str = "unknown"


class PromptFaults:
    """An ``EngineCore.on_token`` hook that fails requests whose prompt text starts with
    ``prefix``; picklable, so it travels to the spawned engine process."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.detokenize: Any = None
        self.doomed: set[str] = set()

    def watch(self, request_id: str, token_ids: list[int]) -> None:
        if self.detokenize is not None and self.detokenize(token_ids).startswith(self.prefix):
            self.doomed.add(request_id)

    def __call__(self, seq: Any, token: int) -> None:
        if seq.request_id in self.doomed:
            self.doomed.discard(seq.request_id)
            raise RuntimeError(f"injected fault (prompt starts with {self.prefix!r})")


def cpu_threads(num_parameters: int, cores: int) -> int:
    """Torch threads for a model on the CPU: one per ~100M parameters, at most one per core. A
    small model's matrices are too small to split, and extra threads only contend for cores."""
    return max(1, min(cores, num_parameters // 100_000_000))


def _set_cpu_threads(config: EngineConfig, num_parameters: int) -> None:
    if config.torch_device().type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = cpu_threads(num_parameters, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    logger.info("CPU engine: %d torch threads for %d parameters", threads, num_parameters)


def _build_engine(config: EngineConfig, faults: PromptFaults | None) -> tuple[Any, Any]:
    from nanoflow.engine.engine_core import EngineCore
    from nanoflow.engine.tokenizer import decode, load_tokenizer
    from nanoflow.models.loader import resolve_model

    spec, checkpoint = resolve_model(config.model)
    _set_cpu_threads(config, spec.num_parameters())
    tokenizer = load_tokenizer(config.tokenizer or checkpoint)
    detokenize = (lambda ids: decode(tokenizer, ids)) if tokenizer is not None else None
    if faults is not None:
        faults.detokenize = detokenize
    engine = EngineCore(config, detokenize=detokenize, on_token=faults)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        engine.eos_token_ids.add(tokenizer.eos_token_id)
    return engine, tokenizer


def _stats(engine: Any) -> dict[str, float]:
    return {
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "kv_usage": engine.blocks.usage,
        "free_blocks": engine.blocks.num_free_blocks,
        "num_blocks": engine.blocks.num_blocks,
        "prefix_cached_tokens": engine.blocks.cached_tokens_served,
        "iteration_seconds": engine.last_step.seconds,
    }


def run_engine(
    config: EngineConfig,
    in_addr: str,
    out_addr: str,
    log_level: int,
    faults: PromptFaults | None = None,
) -> None:
    """Process entry point: build the engine, then serve messages until told to stop.

    Ctrl-C reaches the whole process group; the engine ignores it and stops when the front end
    says so (or when the front end is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(in_addr)
    outbox.connect(out_addr)
    try:
        engine, tokenizer = _build_engine(config, faults)
    except Exception as exc:
        logger.exception("engine failed to start")
        outbox.send_pyobj(("fatal", f"engine failed to start: {type(exc).__name__}: {exc}"))
        return
    info = EngineInfo(
        engine.max_model_len,
        engine.spec.vocab_size,
        engine.blocks.num_blocks,
        tuple(sorted(engine.eos_token_ids)),
        getattr(engine.runner.executor, "name", "unknown"),
    )
    outbox.send_pyobj(("ready", info))
    try:
        grammars = GrammarCompiler(tokenizer, engine.spec.vocab_size, sorted(engine.eos_token_ids))
        _loop(engine, faults, grammars, inbox, outbox)
    except Exception as exc:
        logger.exception("engine loop failed")
        outbox.send_pyobj(("fatal", f"engine loop failed: {type(exc).__name__}: {exc}"))
    finally:
        engine.shutdown()
        outbox.close(linger=1000)
        inbox.close(linger=0)


def _loop(
    engine: Any, faults: PromptFaults | None, grammars: GrammarCompiler, inbox: Any, outbox: Any
) -> None:
    parent = multiprocessing.parent_process()
    step_seconds: list[float] = []
    last_parent_check = time.monotonic()
    while True:
        if inbox.poll(0 if engine.has_unfinished else _IDLE_POLL_MS):
            while True:
                try:
                    message = inbox.recv_pyobj(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not _handle(engine, faults, grammars, outbox, message):
                    return
        if time.monotonic() - last_parent_check > 1.0:
            if parent is not None and not parent.is_alive():
                logger.warning("the server process is gone; stopping the engine")
                return
            last_parent_check = time.monotonic()
        if engine.has_unfinished:
            outputs = engine.step()
            step_seconds.append(engine.last_step.seconds)
            if outputs:
                outbox.send_pyobj(("outputs", outputs, step_seconds))
                step_seconds = []


def _handle(
    engine: Any,
    faults: PromptFaults | None,
    grammars: GrammarCompiler,
    outbox: Any,
    message: tuple,
) -> bool:
    """Apply one front-end message; False means shut down."""
    kind = message[0]
    if kind == "add":
        _, request_id, token_ids, params = message
        try:
            matcher = grammars.matcher(params.structured) if params.structured else None
            seq = engine.add_request(request_id, token_ids, params)
        except RequestError as exc:
            outbox.send_pyobj(("rejected", request_id, str(exc)))
            return True
        if matcher is not None:
            constrain(seq, matcher)
        if faults is not None:
            faults.watch(request_id, token_ids)
    elif kind == "abort":
        for request_id in message[1]:
            engine.abort_request(request_id)
    elif kind == "stats":
        outbox.send_pyobj(("stats", message[1], _stats(engine)))
    elif kind == "shutdown":
        return False
    return True
