"""The OpenAI request shapes the server accepts, as pydantic models.

Validation lives here so a malformed request is answered with a 400 before it costs a tokenizer
call or an engine round trip; bounds that depend on the model (context length, vocabulary) are
checked later, in ``serving.py``, where the engine's numbers are known. Typed fields are strict
(``true`` is not an integer, ``"5"`` is not a number) and every string must be valid Unicode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

MAX_CHOICES = 128
MAX_SEED = 2**63 - 1
MAX_STOP = 16
MAX_LOGPROBS = 20


def _valid_unicode(value: str) -> str:
    """JSON escapes can spell lone surrogates (``"\\ud800"``), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode", "holds a lone surrogate at character {at}, which is not valid Unicode",
            {"at": exc.start},
        ) from None  # fmt: skip
    return value


def _integral(value: Any) -> Any:
    """JSON Schema's integers include ``3.0`` (but not ``true`` or ``"3"``, which strict ints
    refuse too)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Integer(**bounds: int) -> Any:
    """A strict integer with ``Field`` bounds, the float-to-int step outermost so that the
    bounds still reach the JSON schema as ``minimum`` / ``maximum``."""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_integral)]


Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict(), AfterValidator(_valid_unicode)]
NonEmptyText = Annotated[Text, Field(min_length=1)]


def _integral_items(value: Any) -> Any:
    """``_integral`` over a token list, in one pass (long lists are the common case)."""
    if isinstance(value, list) and any(type(v) is float for v in value):
        return [_integral(v) for v in value]
    return value


TokenIds = Annotated[
    list[Annotated[int, Strict(), Field(ge=0)]],
    Field(min_length=1),
    BeforeValidator(_integral_items),
]

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids_error(ids: list, where: str) -> PydanticCustomError | None:
    if not ids:
        return PydanticCustomError("prompt", "{where} is an empty token list", {"where": where})
    for i, token in enumerate(ids):
        if not _is_int(token) or token < 0:
            return PydanticCustomError(
                "prompt", "token ids must be non-negative integers; {where}[{i}] is {token}",
                {"where": where, "i": i, "token": repr(token)},
            )  # fmt: skip
    return None


def _text_error(text: str, where: str) -> PydanticCustomError | None:
    if not text:
        return PydanticCustomError("prompt", "{where} is an empty string", {"where": where})
    try:
        _valid_unicode(text)
    except PydanticCustomError as exc:
        return PydanticCustomError("prompt", "{where} {why}", {"where": where, "why": str(exc)})
    return None


def _prompt_error(value: Any) -> PydanticCustomError:
    """Which of the four prompt shapes was meant and what is wrong with it; pydantic's union
    error would only say that the input is not a string."""
    shapes = PydanticCustomError("prompt", f"must be {_PROMPT_SHAPES}")
    if isinstance(value, str):
        return _text_error(value, "prompt") or shapes
    if not isinstance(value, list):
        return shapes
    if not value:
        return PydanticCustomError("prompt", "must not be an empty list")
    if all(isinstance(v, str) for v in value):
        errors = (_text_error(v, f"prompt[{i}]") for i, v in enumerate(value))
    elif all(isinstance(v, (int, float)) for v in value):
        errors = iter([_token_ids_error(value, "prompt")])
    elif all(isinstance(v, list) for v in value):
        errors = (_token_ids_error(ids, f"prompt[{i}]") for i, ids in enumerate(value))
    else:
        return PydanticCustomError("prompt", f"must be {_PROMPT_SHAPES}, not a mix")
    return next((e for e in errors if e is not None), shapes)


def _prompt_shape(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise _prompt_error(value) from None


def _stop_count(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_STOP:
        raise PydanticCustomError(
            "stop", "at most {limit} stop strings are allowed, got {n}",
            {"limit": MAX_STOP, "n": len(value)},
        )  # fmt: skip
    return value


def _text_parts(value: Any) -> Any:
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "content", "part {i} has type {kind}; this model takes text parts only",
                    {"i": i, "kind": repr(kind)},
                )  # fmt: skip
    return value


Prompt = Annotated[
    NonEmptyText
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
    | Annotated[list[NonEmptyText], Field(min_length=1)],
    # the shapes are disjoint: stop at the first that fits, and try the one long prompts take
    # (token ids) before those that would report an error for each of their items
    Field(union_mode="left_to_right"),
    WrapValidator(_prompt_shape),
]
Stop = Annotated[
    NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None,
    BeforeValidator(_stop_count),
]


# OpenAI and vLLM fields this server does not implement, each with the values that ask for
# nothing (sent by clients that fill in defaults); any other value is refused with a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def refused_fields(extra: dict[str, Any]) -> list[str]:
    """Names of unsupported fields that ``extra`` (a request's undeclared fields) really uses."""
    return sorted(name for name, neutral in UNSUPPORTED.items() if extra.get(name) not in neutral)


class JsonSchemaFormat(BaseModel):
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Bool | None = None


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# OpenAI's ``response_format``: free text, any JSON object, or JSON of a given schema
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class StreamOptions(BaseModel):
    include_usage: Bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's top_k and ignore_eos).

    Fields not declared here are kept in ``model_extra``: the server refuses the ones it knows it
    does not support and ignores (and logs) the rest, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    max_tokens: Integer(ge=1) | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Integer(ge=-1) | None = None
    stop: Stop = None
    seed: Integer(ge=0, le=MAX_SEED) | None = None
    n: Integer(ge=1, le=MAX_CHOICES) = 1
    ignore_eos: Bool = False
    stop_token_ids: list[Integer(ge=0)] | None = None
    min_tokens: Integer(ge=0) = 0
    logit_bias: dict[Text, Annotated[Float, Field(ge=-100.0, le=100.0)]] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=10.0)] = 1.0
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions; at most one constraint per request
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_grammar: Text | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: Integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: Bool = False
    best_of: Integer(ge=1, le=MAX_CHOICES) | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[Text | list[TextPart] | None, BeforeValidator(_text_parts)] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Integer(ge=1) | None = None
    logprobs: Bool = False
    top_logprobs: Integer(ge=0, le=MAX_LOGPROBS) | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: clients (the ``openai`` package included) parse this shape."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoflow"
    max_model_len: int
    vocab_size: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
