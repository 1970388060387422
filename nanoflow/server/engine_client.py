"""The front end's handle on the engine process: submit requests, read their tokens, abort them.

One reader task drains the engine's output pipe and routes each ``RequestOutput`` to the queue of
the HTTP request that owns it, so a slow client never holds up the others. A watchdog notices a
dead engine process and fails every waiting request; then the client starts a new engine while it
has restarts left, and otherwise calls ``on_fatal`` so the server can exit for its supervisor.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import RequestOutput
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.errors import NanoflowError
from nanoflow.server.engine_process import EngineInfo, PromptFaults, run_engine

logger = logging.getLogger(__name__)


class EngineDeadError(NanoflowError):
    """The engine process is gone; nothing more can be served."""


@dataclass
class Event:
    """One item of a request's stream: an engine output, a refusal, or the engine's death.
    ``cut`` says why the server ended the request early (its output ends with 'length')."""

    index: int
    output: RequestOutput | None = None
    rejected: str | None = None
    dead: str | None = None
    cut: str | None = None


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt and choice)."""

    def __init__(self, client: EngineClient, request_ids: list[str]) -> None:
        self.client = client
        self.request_ids = request_ids
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.unfinished = set(request_ids)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while self.unfinished:
            event = await self.queue.get()
            if event.dead is not None:
                self.unfinished.clear()
            elif event.rejected is not None or event.output.finished:
                self.unfinished.discard(self.request_ids[event.index])
            yield event

    def close(self) -> None:
        """Abort what has not finished (client gone, error elsewhere); safe to call twice."""
        self.client.release(self.request_ids, abort=sorted(self.unfinished))
        self.unfinished.clear()
        self.closed = True


class EngineClient:
    def __init__(
        self,
        config: EngineConfig,
        log_level: int = logging.WARNING,
        restarts: int = 0,
        faults: PromptFaults | None = None,
    ) -> None:
        self.config = config
        self.faults = faults
        self.log_level = log_level
        self.info: EngineInfo | None = None
        self.dead_reason: str | None = None
        self.restarts_left = restarts
        self.restarting = False
        self.on_fatal: Callable[[str], None] | None = None
        self._restart_task: asyncio.Task | None = None
        self._streams: dict[str, tuple[RequestStream, int]] = {}
        self._stats: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.iteration_listeners: list[Any] = []

    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    def health(self) -> str | None:
        """None when serving; else what /health reports (restarting, or gone for good)."""
        if not self.dead:
            return None
        if self.restarting:
            return (
                f"the engine died ({self.dead_reason}); restarting it "
                f"({self.restarts_left} more restarts allowed)"
            )
        return f"the engine died ({self.dead_reason}) with no restarts left; the server exits"

    async def start(self, timeout: float = 1800.0) -> EngineInfo:
        """Spawn the engine process and wait until its model is loaded."""
        self._dir = tempfile.TemporaryDirectory(prefix="nanoflow-ipc-")
        in_addr = f"ipc://{Path(self._dir.name) / 'in'}"
        out_addr = f"ipc://{Path(self._dir.name) / 'out'}"
        self._sync_ctx, self._async_ctx = zmq.Context(), zmq.asyncio.Context()
        self._inbox = self._sync_ctx.socket(zmq.PUSH)
        self._inbox.bind(in_addr)
        self._outbox = self._async_ctx.socket(zmq.PULL)
        self._outbox.bind(out_addr)
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_engine,
            args=(self.config, in_addr, out_addr, self.log_level, self.faults),
            name="nanoflow-engine",
        )
        self.process.start()
        try:
            self.info = await self._wait_ready(timeout)
        except BaseException:
            self.process.terminate()
            raise
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        return self.info

    async def _wait_ready(self, timeout: float) -> EngineInfo:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if await self._outbox.poll(500):
                message = await self._outbox.recv_pyobj()
                if message[0] == "ready":
                    return message[1]
                if message[0] == "fatal":
                    raise EngineDeadError(message[1])
            if not self.process.is_alive():
                raise EngineDeadError(f"engine process exited with {self.process.exitcode}")
            if asyncio.get_running_loop().time() > deadline:
                raise EngineDeadError(f"engine did not start within {timeout:.0f} s")

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> RequestStream:
        if self.dead:
            raise EngineDeadError(self.dead_reason)
        base = f"req-{next(self._ids)}"
        ids = [f"{base}-{i}" for i in range(len(requests))]
        stream = RequestStream(self, ids)
        for i, (request_id, (token_ids, params)) in enumerate(zip(ids, requests, strict=True)):
            self._streams[request_id] = (stream, i)
            self._inbox.send_pyobj(("add", request_id, token_ids, params))
        return stream

    def release(self, request_ids: list[str], abort: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)
        if abort and not self.dead:
            self._inbox.send_pyobj(("abort", abort))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        """Finish every in-flight request now (end of a graceful shutdown's grace period)."""
        for stream in {stream for stream, _ in self._streams.values()}:
            unfinished = sorted(stream.unfinished)
            for request_id in unfinished:
                out = RequestOutput(request_id, [], [], 0, 0, True, "length")
                index = stream.request_ids.index(request_id)
                stream.queue.put_nowait(Event(index, output=out, cut=reason))
            self.release(stream.request_ids, abort=unfinished)

    async def stats(self, timeout: float = 5.0) -> dict[str, float]:
        if self.dead:
            raise EngineDeadError(self.dead_reason)
        query = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._stats[query] = future
        self._inbox.send_pyobj(("stats", query))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._stats.pop(query, None)

    async def _read(self) -> None:
        while True:
            message = await self._outbox.recv_pyobj()
            kind = message[0]
            if kind == "outputs":
                for seconds in message[2]:
                    for listener in self.iteration_listeners:
                        listener(seconds)
                for out in message[1]:
                    self._route(out.request_id, Event(0, output=out))
            elif kind == "rejected":
                self._route(message[1], Event(0, rejected=message[2]))
            elif kind == "stats":
                future = self._stats.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif kind == "fatal":
                self._die(message[1])

    def _route(self, request_id: str, event: Event) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            stream, event.index = entry
            stream.queue.put_nowait(event)

    async def _watch(self) -> None:
        while self.process.is_alive():
            await asyncio.sleep(0.2)
        self._die(f"engine process exited with code {self.process.exitcode}")

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        logger.error("engine is dead: %s", reason)
        self.dead_reason = reason
        for stream in {stream for stream, _ in self._streams.values()}:
            stream.queue.put_nowait(Event(0, dead=reason))
        self._streams.clear()
        for future in self._stats.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        if self.restarts_left > 0:
            self.restarting = True
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())
        elif self.on_fatal is not None:
            self.on_fatal(reason)

    async def _restart(self) -> None:
        """Start a fresh engine process, spending one restart per attempt."""
        while self.restarts_left > 0:
            self.restarts_left -= 1
            for task in self._tasks:
                task.cancel()
            self._close_pipes()
            logger.warning("restarting the engine (%d more restarts allowed)", self.restarts_left)
            try:
                await self.start()
            except (EngineDeadError, OSError) as exc:
                self.dead_reason = f"restart failed: {exc}"
                logger.error("engine restart failed: %s", exc)
                continue
            self.dead_reason, self.restarting = None, False
            logger.warning("the engine is serving again")
            return
        self.restarting = False
        if self.on_fatal is not None:
            self.on_fatal(self.dead_reason or "the engine could not be restarted")

    def _close_pipes(self) -> None:
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._dir.cleanup()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, ask the engine to stop, and make sure its process is gone."""
        self.abort_all()
        if self._restart_task is not None:
            self._restart_task.cancel()
        for task in self._tasks:
            task.cancel()
        process = getattr(self, "process", None)
        if process is not None and process.is_alive():
            self._inbox.send_pyobj(("shutdown",))
            await asyncio.get_running_loop().run_in_executor(None, process.join, timeout)
            if process.is_alive():
                logger.warning("engine process did not stop; terminating it")
                process.terminate()
                process.join(5)
        self._close_pipes()
