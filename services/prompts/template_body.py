"""A template version's body: sandboxed Jinja2 messages plus a JSON Schema for their variables.

Checks that can be made once are made at CreateVersion (syntax with the line,
schema validity, constructs that only serve sandbox escapes), so a bad version
never reaches the registry. What only shows at render time (a value that trips
the sandbox) surfaces as :class:`sluice.kafka.RequestFailed` with a gRPC code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jinja2
import jsonschema
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sluice.kafka import RequestFailed
from sluice.v1 import templates_pb2

ROLES: Final = ("system", "user", "assistant")
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# `documents` is filled from the request's context documents, never from variables.
RESERVED_VARIABLES: Final = frozenset({"documents"})
# Names that exist only to reach Python internals from a template.
_FORBIDDEN_NAMES: Final = frozenset({"self", "lipsum", "cycler", "joiner", "config", "request"})
_UNSAFE_NODES: Final = (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)


class TemplateRejected(ValueError):
    """The version cannot be stored; the message starts with the field at fault."""

    def __init__(self, message: str, escape: bool = False) -> None:
        super().__init__(message)
        self.escape = escape  # a sandbox escape attempt, which is audited


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )
    for name in ("lipsum", "cycler", "joiner"):
        env.globals.pop(name, None)
    return env


ENVIRONMENT: Final = _environment()


def _escape_attempts(tree: nodes.Node) -> Iterator[str]:
    """Constructs a prompt never needs but an escape always does (dunders, imports, `self`)."""
    for node in tree.find_all(nodes.Node):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            yield f"attribute {node.attr!r} on line {node.lineno}"
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
            and node.arg.value.startswith("_")
        ):
            yield f"item {node.arg.value!r} on line {node.lineno}"
        elif isinstance(node, nodes.Filter) and node.name == "attr":
            yield f"the attr filter on line {node.lineno}"
        elif isinstance(node, _UNSAFE_NODES):
            yield f"{type(node).__name__.lower()} on line {node.lineno}"
        elif isinstance(node, nodes.Name) and node.name in _FORBIDDEN_NAMES:
            yield f"name {node.name!r} on line {node.lineno}"


def _compile_message(index: int, source: str) -> jinja2.Template:
    field = f"messages[{index}].content"
    try:
        tree = ENVIRONMENT.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRejected(
            f"{field}: template syntax error on line {exc.lineno}: {exc.message}"
        ) from None
    attempts = list(_escape_attempts(tree))
    if attempts:
        raise TemplateRejected(f"{field}: refused by the sandbox: {', '.join(attempts)}", escape=True)
    return ENVIRONMENT.from_string(source)


def _compile_schema(text: str) -> jsonschema.protocols.Validator | None:
    if not text.strip():
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateRejected(f"variables_schema: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(schema, dict):
        raise TemplateRejected("variables_schema: must be a JSON object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise TemplateRejected(f"variables_schema: invalid at {where}: {exc.message}") from None
    clash = RESERVED_VARIABLES & set(schema.get("properties", {}))
    if clash:
        raise TemplateRejected(f"variables_schema: {', '.join(sorted(clash))} is reserved for context")
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def check_name(field: str, name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise TemplateRejected(
            f"{field}: {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class TemplateBody:
    """A version compiled once, rendered many times."""

    version: templates_pb2.TemplateVersion
    messages: tuple[tuple[str, jinja2.Template], ...]
    validator: jsonschema.protocols.Validator | None

    @classmethod
    def compile(cls, version: templates_pb2.TemplateVersion) -> TemplateBody:
        check_name("name", version.name)
        if not version.messages:
            raise TemplateRejected("messages: a template needs at least one message")
        compiled = []
        for i, message in enumerate(version.messages):
            if message.role not in ROLES:
                raise TemplateRejected(f"messages[{i}].role: must be one of {', '.join(ROLES)}")
            compiled.append((message.role, _compile_message(i, message.content)))
        return cls(version, tuple(compiled), _compile_schema(version.variables_schema))

    @property
    def ref(self) -> str:
        return f"{self.version.name}@{self.version.version}"

    def typed_variables(self, variables: Mapping[str, str]) -> dict[str, Any]:
        """Variables travel as strings; where the schema wants another type, the string is JSON."""
        schema = self.validator.schema if self.validator else {}
        properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
        typed: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in variables.items():
            wanted = (
                properties.get(key, {}).get("type", "string") if isinstance(properties, dict) else "string"
            )
            wants_string = wanted == "string" or (isinstance(wanted, list) and "string" in wanted)
            if wants_string:
                typed[key] = value
                continue
            try:
                typed[key] = json.loads(value)
            except json.JSONDecodeError:
                problems.append(f"variables.{key}: must be JSON for type {wanted}")
        if problems:
            raise RequestFailed("INVALID_ARGUMENT", "; ".join(problems))
        return typed

    def validate(self, variables: Mapping[str, Any]) -> None:
        """Every schema violation, named by path; never the offending value (it may be personal)."""
        if self.validator is None:
            return
        problems: list[str] = []
        for error in sorted(self.validator.iter_errors(dict(variables)), key=lambda e: list(e.path)):
            path = ".".join(["variables", *(str(p) for p in error.absolute_path)])
            if error.validator == "required":
                missing = [p for p in error.validator_value if p not in (error.instance or {})]
                problems.extend(f"variables.{name}: is required" for name in missing)
            elif error.validator == "additionalProperties":
                problems.append(f"{path}: unexpected variable(s) ({error.message.split('(')[-1]}")
            else:
                rule = json.dumps(error.validator_value)
                problems.append(f"{path}: must satisfy {error.validator} {rule}")
        if problems:
            raise RequestFailed("INVALID_ARGUMENT", "; ".join(problems))

    def render(self, variables: Mapping[str, Any], documents: Sequence[str]) -> list[tuple[str, str]]:
        scope = {**variables, "documents": list(documents)}
        out = []
        for i, (role, template) in enumerate(self.messages):
            try:
                out.append((role, template.render(scope)))
            except SecurityError as exc:
                raise RequestFailed(
                    "INVALID_ARGUMENT", f"template: {self.ref} messages[{i}] refused by the sandbox: {exc}"
                ) from None
            except jinja2.UndefinedError as exc:
                raise RequestFailed("INVALID_ARGUMENT", f"variables: {exc.message} in {self.ref}") from None
            except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as exc:
                raise RequestFailed(
                    "INVALID_ARGUMENT",
                    f"template: {self.ref} messages[{i}] failed to render: {type(exc).__name__}",
                ) from None
        return out
