"""From a request's structured-output fields (OpenAI's ``response_format``, vLLM's ``guided_*``)
to the one constraint the engine enforces."""

from __future__ import annotations

import json

from nanoflow.engine.grammar import choice_grammar
from nanoflow.engine.sampling_params import StructuredOutput
from nanoflow.server.errors import APIError
from nanoflow.server.protocol import SamplingFields


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The request's constraint, or None; a 400 when it asks for more than one."""
    asked: list[tuple[str, StructuredOutput]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", StructuredOutput("json")))
    elif fmt is not None and fmt.type == "json_schema":
        schema = json.dumps(fmt.json_schema.schema_)
        asked.append(("response_format", StructuredOutput("json_schema", schema)))
    if req.guided_json is not None:
        schema = (
            req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
        )
        asked.append(("guided_json", StructuredOutput("json_schema", schema)))
    if req.guided_regex is not None:
        asked.append(("guided_regex", StructuredOutput("regex", req.guided_regex)))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", StructuredOutput("grammar", req.guided_grammar)))
    if req.guided_choice is not None:
        asked.append(
            ("guided_choice", StructuredOutput("grammar", choice_grammar(req.guided_choice)))
        )
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise APIError(
            400, f"give one structured-output constraint, not {names}", param=asked[1][0]
        )
    return asked[0][1] if asked else None
