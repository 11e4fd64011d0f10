"""Generate JSON Schemas (draft 2020-12) for the events Kafka producers may send as JSON.

The schemas follow protobuf's canonical JSON mapping (lowerCamelCase names,
64-bit integers as strings, enums by name, Timestamps as RFC 3339), which is
what `sluice.topics.Codec` parses. Comments in the .proto files become
descriptions. Deterministic, so `make lint` can tell when they are stale.

    python tools/gen_json_schemas.py [OUT_DIR]     # default: schemas/json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
# message -> schema file; the topic a producer sends it to is in the title.
SCHEMAS = {"sluice.v1.GenerationRequested": ("generation_requested.schema.json", "sluice.requests.v1")}
# Fields Sluice refuses a record without (proto3 has no `required`).
REQUIRED = {
    "sluice.v1.GenerationRequested": ["envelope"],
    "sluice.v1.Envelope": ["requestId", "attempt", "tenant", "schemaVersion"],
    "sluice.v1.ChatMessage": ["role", "content"],
}
# Producers must not set these: the ingress fills or overwrites them (docs/ingress.md).
SET_BY_SLUICE = {"sluice.v1.GenerationRequested": {"replyTo", "keyId"}}
F = descriptor_pb2.FieldDescriptorProto
INT32 = {F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32}
UINT32 = {F.TYPE_UINT32, F.TYPE_FIXED32}
INT64 = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64, F.TYPE_UINT64, F.TYPE_FIXED64}
WELL_KNOWN = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, e.g. 2026-11-29T22:00:00Z",
    },
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """Every proto, with source info (for comments), through grpc_tools' protoc."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I",
                str(ROOT / "protos"),
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *protos,
            ],
            check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Builder:
    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        for file in files.file:
            self._index(file)

    def _index(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        paths = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

        def walk(messages: Any, prefix: str, path: tuple[int, ...]) -> None:
            for i, message in enumerate(messages):
                name, here = f"{prefix}.{message.name}", (*path, i)
                self.messages[name] = message
                self.comments[name] = paths.get(here, "")
                for j, fld in enumerate(message.field):
                    self.comments[f"{name}.{fld.name}"] = paths.get((*here, 2, j), "")
                walk(message.nested_type, name, (*here, 3))
                for enum in message.enum_type:
                    self.enums[f"{name}.{enum.name}"] = enum

        walk(file.message_type, file.package, (4,))
        for enum in file.enum_type:
            self.enums[f"{file.package}.{enum.name}"] = enum

    def schema(self, full_name: str, topic: str) -> dict[str, Any]:
        defs: dict[str, Any] = {}
        root = self._message(full_name, defs)
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://sluice.dev/schemas/json/{SCHEMAS[full_name][0]}",
            "title": f"{full_name} on {topic} (protobuf JSON mapping; header content-type: application/json)",
            **root,
            "$defs": dict(sorted(defs.items())),
        }

    def _message(self, full_name: str, defs: dict[str, Any]) -> dict[str, Any]:
        message = self.messages[full_name]
        properties: dict[str, Any] = {}
        for fld in message.field:
            if fld.json_name in SET_BY_SLUICE.get(full_name, ()):
                continue
            schema = self._field(fld, defs)
            text = _describe(self.comments.get(f"{full_name}.{fld.name}", ""))
            if text:
                schema = {**schema, "description": text}
            properties[fld.json_name] = schema
        out: dict[str, Any] = {"type": "object"}
        text = _describe(self.comments.get(full_name, ""))
        if text:
            out["description"] = text
        out["properties"] = properties
        if full_name in REQUIRED:
            out["required"] = REQUIRED[full_name]
        out["additionalProperties"] = False
        return out

    def _field(self, fld: descriptor_pb2.FieldDescriptorProto, defs: dict[str, Any]) -> dict[str, Any]:
        name = fld.type_name.lstrip(".")
        entry = self.messages.get(name)
        if fld.type == F.TYPE_MESSAGE and entry is not None and entry.options.map_entry:
            return {"type": "object", "additionalProperties": self._single(entry.field[1], defs)}
        single = self._single(fld, defs)
        return {"type": "array", "items": single} if fld.label == F.LABEL_REPEATED else single

    def _single(self, fld: descriptor_pb2.FieldDescriptorProto, defs: dict[str, Any]) -> dict[str, Any]:
        name = fld.type_name.lstrip(".")
        if fld.type == F.TYPE_MESSAGE:
            if name in WELL_KNOWN:
                return dict(WELL_KNOWN[name])
            short = name.rsplit(".", 1)[-1]
            if short not in defs:
                defs[short] = {}  # placeholder: stops recursion
                defs[short] = self._message(name, defs)
            return {"$ref": f"#/$defs/{short}"}
        if fld.type == F.TYPE_ENUM:
            values = [v.name for v in self.enums[name].value]
            return {"anyOf": [{"type": "string", "enum": values}, {"type": "integer"}]}
        if fld.type in INT32:
            return {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
        if fld.type in UINT32:
            return {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
        if fld.type in INT64:
            return {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]}
        if fld.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            return {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
        if fld.type == F.TYPE_BOOL:
            return {"type": "boolean"}
        if fld.type == F.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}


def _describe(comment: str) -> str:
    return re.sub(r"\s+", " ", comment).strip()


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else ROOT / "schemas" / "json"
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = Builder(descriptor_set())
    for full_name, (file_name, topic) in SCHEMAS.items():
        text = json.dumps(builder.schema(full_name, topic), indent=2) + "\n"
        (out_dir / file_name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
