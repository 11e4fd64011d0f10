"""Gateway checks on a templated GenerateRequest (prompts area).

Only the shape is checked here; whether the template, version or label exists
and whether the variables fit its schema is the prompts service's answer,
which reaches the caller as NOT_FOUND or INVALID_ARGUMENT on the stream.
"""

from __future__ import annotations

from sluice.v1 import gateway_pb2

MAX_VARIABLES = 64
MAX_CONTEXT_DOCUMENTS = 32


def template_problem(request: gateway_pb2.GenerateRequest) -> str | None:
    """The first problem with the template fields, as 'field: reason', or None."""
    if not request.HasField("template"):
        if request.variables:
            return "variables: only allowed with a template"
        return None
    ref = request.template
    if not ref.name:
        return "template.name: must not be empty"
    if ref.version and ref.label:
        return "template: name either a version or a label, not both"
    if len(request.variables) > MAX_VARIABLES:
        return f"variables: at most {MAX_VARIABLES} variables"
    if any(not key for key in request.variables):
        return "variables: names must not be empty"
    if len(request.context) > MAX_CONTEXT_DOCUMENTS:
        return f"context: at most {MAX_CONTEXT_DOCUMENTS} documents"
    return None
