"""Checks on GenerateRequest; each failure names the field the caller must fix."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.gateway.templating import template_problem
from sluice.config import ModelCatalog
from sluice.v1 import gateway_pb2

ROLES = ("system", "user", "assistant")
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Invalid(Exception):
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ValidRequest:
    model: str
    max_tokens: int
    temperature: float
    top_p: float


def validate(request: gateway_pb2.GenerateRequest, catalog: ModelCatalog) -> ValidRequest:
    """Raise Invalid for the first problem; return the request with defaults applied."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    model = catalog.resolve(request.model)
    if model is None:
        known = ", ".join(sorted(catalog.models))
        raise Invalid(grpc.StatusCode.NOT_FOUND, f"model: unknown model {request.model!r} (known: {known})")
    problem = template_problem(request)
    if problem:
        raise Invalid(bad, problem)
    if not request.messages and not request.HasField("template"):
        raise Invalid(bad, "messages: at least one message is required")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise Invalid(bad, f"messages[{i}].role: must be one of {', '.join(ROLES)}")
        if not message.content.strip():
            raise Invalid(bad, f"messages[{i}].content: must not be empty")
    spec = catalog.models[model]
    max_tokens = request.max_tokens if request.HasField("max_tokens") else spec.max_output_tokens // 4
    if max_tokens <= 0:
        raise Invalid(bad, "max_tokens: must be greater than 0")
    if max_tokens > spec.max_output_tokens:
        raise Invalid(bad, f"max_tokens: must be at most {spec.max_output_tokens} for model {model}")
    temperature = request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE
    if not 0.0 <= temperature <= 2.0:
        raise Invalid(bad, "temperature: must be between 0 and 2")
    top_p = request.top_p if request.HasField("top_p") else DEFAULT_TOP_P
    if not 0.0 < top_p <= 1.0:
        raise Invalid(bad, "top_p: must be greater than 0 and at most 1")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise Invalid(bad, f"stop: at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in request.stop):
        raise Invalid(bad, "stop: stop sequences must not be empty")
    return ValidRequest(model, max_tokens, temperature, top_p)
