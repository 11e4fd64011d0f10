"""`sluice prompts …`: the template registry from a shell, and templated `sluice generate`.

A template file is YAML::

    messages:
      - {role: system, content: "You answer questions about {{ product }}."}
      - {role: user, content: "{{ question }}"}
    variables: {type: object, required: [product, question], properties: {...}}  # JSON Schema
    model: smollm2-135m-instruct      # optional: allowed model(s)
    max_tokens: 64                    # optional: default max_tokens
    stop: ["###"]                     # optional
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import json
from pathlib import Path
from typing import Any

import grpc
import yaml

from sluice.cli import Commands, as_dict, grpc_channel, print_json
from sluice.config import Settings
from sluice.v1 import envelope_pb2, gateway_pb2, prompts_pb2, prompts_pb2_grpc, templates_pb2


class UsageError(SystemExit):
    """Bad command-line input: exit 2 with the argument named."""

    def __init__(self, message: str) -> None:
        super().__init__(f"sluice prompts: {message}")


def parse_ref(text: str) -> templates_pb2.TemplateRef:
    """`NAME`, `NAME@7` or `NAME@production`."""
    name, _, suffix = text.partition("@")
    if suffix.isdigit():
        return templates_pb2.TemplateRef(name=name, version=int(suffix))
    return templates_pb2.TemplateRef(name=name, label=suffix)


def parse_vars(pairs: list[str] | None) -> dict[str, str]:
    variables: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--var: expected k=v, got {pair!r}")
        variables[key] = value
    return variables


def read_context(paths: list[str] | None) -> list[str]:
    return [Path(p).read_text() for p in paths or []]


def parse_variants(text: str) -> list[templates_pb2.Variant]:
    """`7` or weighted `7:90,8:10`."""
    variants = []
    for part in text.split(","):
        version, _, weight = part.partition(":")
        if not version.strip().isdigit() or (weight and not weight.strip().isdigit()):
            raise UsageError(f"VERSION: expected N or N:WEIGHT,M:WEIGHT, got {text!r}")
        variants.append(templates_pb2.Variant(version=int(version), weight=int(weight or 0)))
    return variants


def load_template_file(path: Path, schema_file: str | None) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"FILE: cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise UsageError(f"FILE: {path} needs a 'messages' list of {{role, content}}")
    if schema_file:
        doc["variables"] = json.loads(Path(schema_file).read_text())
    return doc


def create_request(
    name: str, doc: dict[str, Any], note: str, author: str
) -> prompts_pb2.CreateVersionRequest:
    models = doc.get("model") or []
    request = prompts_pb2.CreateVersionRequest(
        name=name,
        messages=[
            envelope_pb2.ChatMessage(role=str(m.get("role", "")), content=str(m.get("content", "")))
            for m in doc["messages"]
        ],
        variables_schema=json.dumps(doc["variables"]) if doc.get("variables") else "",
        constraints=templates_pb2.ModelConstraints(
            allowed_models=[models] if isinstance(models, str) else list(models),
            default_max_tokens=int(doc.get("max_tokens") or 0),
            stop=list(doc.get("stop") or []),
        ),
        author=author,
        note=note,
    )
    return request


def _stub(settings: Settings) -> tuple[grpc.Channel, prompts_pb2_grpc.PromptsStub]:
    channel = grpc_channel(settings, "prompts")
    return channel, prompts_pb2_grpc.PromptsStub(channel)


def _show_version(version: templates_pb2.TemplateVersion, labels: list[str]) -> None:
    print(f"{version.name} v{version.version}  labels: {', '.join(labels) or '-'}")
    print(f"author: {version.author or '-'}  created: {version.created_at.ToJsonString()}")
    print(f"note: {version.note or '-'}")
    c = version.constraints
    if c.allowed_models or c.default_max_tokens or c.stop:
        print(f"models: {', '.join(c.allowed_models) or 'any'}  max_tokens: {c.default_max_tokens or '-'}")
    for m in version.messages:
        print(f"--- {m.role}\n{m.content}")
    if version.variables_schema:
        print(f"--- variables schema\n{json.dumps(json.loads(version.variables_schema), indent=2)}")


def cmd_put(settings: Settings, args: argparse.Namespace) -> int:
    doc = load_template_file(Path(args.file), args.schema)
    request = create_request(args.name, doc, args.note, args.author or getpass.getuser())
    channel, stub = _stub(settings)
    with channel:
        version = stub.CreateVersion(request).version
    if args.json:
        print_json(as_dict(version))
    else:
        print(f"created {version.name} v{version.version}")
    return 0


def cmd_get(settings: Settings, args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    if not ref.version and not ref.label:
        ref.label = "latest"
    channel, stub = _stub(settings)
    with channel:
        found = stub.GetTemplate(prompts_pb2.GetTemplateRequest(ref=ref))
    if args.json:
        print_json({"version": as_dict(found.version), "labels": list(found.labels)})
    else:
        _show_version(found.version, list(found.labels))
    return 0


def _pointer_text(pointer: templates_pb2.LabelPointer) -> str:
    arms = [f"v{v.version}" + (f":{v.weight}" if len(pointer.variants) > 1 else "") for v in pointer.variants]
    return f"{pointer.label}→{','.join(arms)}"


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    channel, stub = _stub(settings)
    with channel:
        if args.name:
            versions = stub.ListVersions(prompts_pb2.ListVersionsRequest(name=args.name))
            if args.json:
                print_json(as_dict(versions))
                return 0
            for v in versions.versions:
                print(f"v{v.version:<5} {v.created_at.ToJsonString():<26} {v.author:<12} {v.note}")
            print("labels: " + (" ".join(_pointer_text(p) for p in versions.labels) or "-"))
            return 0
        listing = stub.ListTemplates(prompts_pb2.ListTemplatesRequest())
    if args.json:
        print_json(as_dict(listing))
    else:
        for t in listing.templates:
            labels = " ".join(_pointer_text(p) for p in t.labels) or "-"
            print(f"{t.name:<32} latest v{t.latest_version:<5} {labels}")
    return 0


def cmd_label(settings: Settings, args: argparse.Namespace) -> int:
    request = prompts_pb2.SetLabelRequest(
        name=args.name,
        label=args.label,
        variants=parse_variants(args.version),
        author=args.author or getpass.getuser(),
    )
    channel, stub = _stub(settings)
    with channel:
        pointer = stub.SetLabel(request).label
    if args.json:
        print_json(as_dict(pointer))
    else:
        print(f"{pointer.name}: {_pointer_text(pointer)}")
    return 0


def cmd_render(settings: Settings, args: argparse.Namespace) -> int:
    request = prompts_pb2.RenderRequest(
        model=args.model,
        template=parse_ref(args.ref),
        variables=parse_vars(args.var),
        context=read_context(args.context),
        user=args.user,
    )
    channel, stub = _stub(settings)
    with channel:
        rendered = stub.Render(request)
    if args.json:
        print_json(as_dict(rendered))
    else:
        used = rendered.template_used
        variant = f" variant {used.variant}" if used.variant else ""
        print(rendered.prompt)
        print(
            f"\n-- {used.name} v{used.version}{variant}  model {rendered.model}  "
            f"prompt_tokens {rendered.prompt_tokens}  max_tokens {rendered.max_tokens}"
        )
    return 0


def cmd_diff(settings: Settings, args: argparse.Namespace) -> int:
    channel, stub = _stub(settings)
    with channel:
        old, new = (
            stub.GetTemplate(
                prompts_pb2.GetTemplateRequest(ref=templates_pb2.TemplateRef(name=args.name, version=v))
            ).version
            for v in (args.v1, args.v2)
        )

    def lines(version: templates_pb2.TemplateVersion) -> list[str]:
        doc = {
            "messages": [{"role": m.role, "content": m.content} for m in version.messages],
            "variables": json.loads(version.variables_schema) if version.variables_schema else None,
            "constraints": as_dict(version.constraints),
        }
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).splitlines()

    diff = list(
        difflib.unified_diff(
            lines(old), lines(new), f"{args.name}@{args.v1}", f"{args.name}@{args.v2}", lineterm=""
        )
    )
    if args.json:
        print_json({"diff": diff})
    else:
        print("\n".join(diff) if diff else "no differences")
    return 0


def apply_generate_options(request: gateway_pb2.GenerateRequest, args: argparse.Namespace) -> None:
    """`sluice generate --template NAME[@…] --var k=v --context FILE`: a templated request."""
    if not args.prompt:
        del request.messages[:]  # a template needs no prompt; its messages may hold history
    if args.template:
        request.template.CopyFrom(parse_ref(args.template))
        request.variables.update(parse_vars(args.var))
        request.context.extend(read_context(args.context))
    elif args.var or args.context:
        raise UsageError("--var and --context need --template")
    elif not request.messages:
        raise UsageError("generate: give a prompt or --template")


def add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", help="NAME, NAME@VERSION or NAME@LABEL (default label: production)")
    parser.add_argument("--var", action="append", metavar="K=V", help="template variable (repeatable)")
    parser.add_argument("--context", action="append", metavar="FILE", help="context document (repeatable)")


def register(commands: Commands) -> None:
    group = commands.group("prompts", "manage versioned prompt templates")
    put = commands.add("put", cmd_put, "create the next version of a template from a YAML file", into=group)
    put.add_argument("name")
    put.add_argument("file")
    put.add_argument("--schema", help="JSON Schema file for the variables (overrides the file's)")
    put.add_argument("--note", default="", help="change note")
    put.add_argument("--author", default="")
    get = commands.add("get", cmd_get, "show a version (NAME, NAME@VERSION or NAME@LABEL)", into=group)
    get.add_argument("ref")
    listing = commands.add("list", cmd_list, "list templates, or one template's versions", into=group)
    listing.add_argument("name", nargs="?", default="")
    label = commands.add("label", cmd_label, "point a label at a version (N, or N:W,M:W for A/B)", into=group)
    label.add_argument("name")
    label.add_argument("version")
    label.add_argument("label")
    label.add_argument("--author", default="")
    render = commands.add("render", cmd_render, "dry-run: the final prompt and its token count", into=group)
    render.add_argument("ref")
    render.add_argument("--var", action="append", metavar="K=V")
    render.add_argument("--context", action="append", metavar="FILE")
    render.add_argument("--model", default="")
    render.add_argument("--user", default="", help="end-user id, for the experiment arm")
    diff = commands.add("diff", cmd_diff, "unified diff of two versions", into=group)
    diff.add_argument("name")
    diff.add_argument("v1", type=int)
    diff.add_argument("v2", type=int)
