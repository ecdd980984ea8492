"""Structured output over HTTP: OpenAI's `response_format` and vLLM's `guided_*` -> the wire's StructuredOutput.

A body sets at most one of `response_format` (type json_object or json_schema; "text" is free
text), `guided_json` (a schema, as an object or its JSON text), `guided_regex`, `guided_choice`
and `guided_grammar`; the `openai` client sends the guided ones in `extra_body`, which arrive
as top-level fields. Only the shape is checked here: whether a schema or pattern compiles is the
server's preparation's word (INVALID_ARGUMENT, 400), the same over HTTP and gRPC.

It knows the OpenAI bodies and the protobuf message, nothing about how constraints are enforced.
"""

from __future__ import annotations

import json

from loramux.v1 import inference_pb2 as pb
from server.http.errors import ApiError
from server.http.openai_types import StructuredFields


def structured_output_pb(body: StructuredFields) -> pb.StructuredOutput | None:
    """The body's constraint as a StructuredOutput message; None for free text."""
    given: list[tuple[str, pb.StructuredOutput]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        given.append(("response_format", pb.StructuredOutput(json_object=True)))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_ if response_format.json_schema else None
        if schema is None:
            raise ApiError(
                400,
                "response_format.json_schema.schema is required with type json_schema "
                '(e.g. {"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}}})',
                param="response_format.json_schema.schema",
            )
        given.append(("response_format", pb.StructuredOutput(json_schema=json.dumps(schema))))
    if body.guided_json is not None:
        spec = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        given.append(("guided_json", pb.StructuredOutput(json_schema=spec)))
    if body.guided_regex is not None:
        given.append(("guided_regex", pb.StructuredOutput(regex=body.guided_regex)))
    if body.guided_choice is not None:
        choices = pb.ChoiceList(choices=body.guided_choice)
        given.append(("guided_choice", pb.StructuredOutput(choice=choices)))
    if body.guided_grammar is not None:
        given.append(("guided_grammar", pb.StructuredOutput(grammar=body.guided_grammar)))
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise ApiError(400, f"set one structured output, not several: {names}", param=given[1][0])
    return given[0][1] if given else None
