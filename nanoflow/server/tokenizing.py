"""The front end's tokenizer calls, run off the event loop.

Tokenizing a long prompt takes seconds of CPU; on the event loop it would stall every running
stream and ``/health`` for that long, so encoding and chat templates run in a small thread pool.
Before that, a prompt whose UTF-8 length alone proves it cannot fit the context is refused without
being tokenized: no token covers more bytes than the longest one in the vocabulary.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nanoflow.server.errors import APIError

_THREADS = 2


def longest_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the input bytes one token stands for (a vocabulary entry's UTF-8 length
    is at least the bytes it encodes, for byte-level and SentencePiece vocabularies alike)."""
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "replace")) for token in vocab), default=1)


class FrontEndTokenizer:
    """Encodes prompts and applies chat templates in worker threads, refusing hopeless lengths."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.max_token_bytes = longest_token_bytes(tokenizer)
        self._pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="nanoflow-tokenize")

    def check_length(self, text: str, max_model_len: int, param: str) -> None:
        """Refuse ``text`` if even its fewest possible tokens would fill the context."""
        fewest = len(text.encode("utf-8")) // self.max_token_bytes
        if fewest >= max_model_len:
            raise APIError(
                400, f"the prompt has at least {fewest} tokens; the context is {max_model_len}",
                param=param, code="context_length_exceeded",
            )  # fmt: skip

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def encode(
        self, text: str, max_model_len: int, param: str, add_special_tokens: bool = True
    ) -> list[int]:
        self.check_length(text, max_model_len, param)
        return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def chat_prompt(self, messages: list[dict[str, str]], max_model_len: int) -> list[int]:
        self.check_length("".join(m["content"] for m in messages), max_model_len, "messages")
        try:
            text = await self._run(
                self.tokenizer.apply_chat_template,
                messages,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja errors, or a tokenizer without a template
            raise APIError(
                400, f"cannot apply the chat template: {exc}", param="messages"
            ) from None
        return await self.encode(text, max_model_len, "messages", add_special_tokens=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
