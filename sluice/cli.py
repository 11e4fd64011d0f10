"""The `sluice` command: run the local stack and talk to it."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from sluice import tls
from sluice.broker import BrokerError
from sluice.config import SERVICES, ConfigError, Settings, load_settings
from sluice.stack import Stack, StackError
from sluice.v1 import (
    envelope_pb2,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def demo_key(settings: Settings) -> str:
    from services.gateway.auth import demo_key_file

    path = demo_key_file(settings.state_dir)
    if not path.exists():
        raise SystemExit(f"no demo key at {path}: start the stack first (make run or sluice up)")
    return path.read_text().strip()


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    stack = Stack(settings)
    started = time.monotonic()
    stack.up()
    _announce(settings, time.monotonic() - started, args.json)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Foreground: start everything, then stop everything on Ctrl-C."""
    stack = Stack(settings)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    try:
        stack.up()
        _announce(settings, time.monotonic() - started, args.json)
        print("Press Ctrl-C to stop.", flush=True)
        while not stopping:
            for name in SERVICES:
                if stack.pid(name) is None and not stopping:
                    print(f"{name} exited; see {stack.log_dir / name}.log. Stopping.", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("Stopping Sluice...", flush=True)
        stack.down()
        print("Sluice stopped.", flush=True)
    return 0


def _announce(settings: Settings, seconds: float, as_json: bool) -> None:
    key = demo_key(settings)
    if as_json:
        print_json(
            {
                "ready": True,
                "gateway": settings.grpc_target("gateway"),
                "demo_key": key,
                "kafka": settings.bootstrap,
                "seconds": round(seconds, 1),
            }
        )
        return
    print(
        f"\nSluice is up in {seconds:.0f}s.  Gateway: {settings.grpc_target('gateway')}"
        f"  Kafka: {settings.bootstrap}\n"
        f'  Try:      .venv/bin/sluice generate "Write a haiku about rivers"\n'
        f"  Audit:    .venv/bin/sluice audit trail <request_id>\n"
        f"  Usage:    .venv/bin/sluice usage\n"
        f"  grpcurl:  grpcurl -plaintext -H 'authorization: Bearer {key}' "
        f'-d \'{{"messages":[{{"role":"user","content":"hi"}}]}}\' '
        f"{settings.grpc_target('gateway')} sluice.v1.Gateway/Generate\n"
        f"  Logs:     {settings.state_dir / 'logs'}\n",
        flush=True,
    )


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    Stack(settings).down()
    if args.json:
        print_json({"stopped": True})
    else:
        print("Sluice stopped.")
    return 0


def cmd_topics_apply(settings: Settings, args: argparse.Namespace) -> int:
    report = Stack(settings).apply_topics()
    if args.json:
        print_json({"created": report.created, "unchanged": report.unchanged, "drift": report.drift})
    else:
        for name in report.created:
            print(f"created   {name}")
        for name in report.unchanged:
            print(f"unchanged {name}")
        for line in report.drift:
            print(f"DRIFT     {line}")
    return 4 if report.drift else 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from sluice.service import run

    module = importlib.import_module(f"services.{args.service}.service")
    run(module.build(settings))
    return 0


def grpc_channel(settings: Settings, service: Any) -> grpc.Channel:
    return tls.channel(settings, settings.grpc_target(service))


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from sluice.cli_prompts import apply_generate_options

    request = gateway_pb2.GenerateRequest(
        model=args.model,
        messages=[envelope_pb2.ChatMessage(role="user", content=" ".join(args.prompt))],
        user=args.user,
        idempotency_key=args.idempotency_key,
    )
    apply_generate_options(request, args)
    if args.system:
        request.messages.insert(0, envelope_pb2.ChatMessage(role="system", content=args.system))
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.temperature = args.temperature
    metadata = (("authorization", f"Bearer {args.api_key or demo_key(settings)}"),)
    last = gateway_pb2.GenerateResponse()
    with grpc_channel(settings, "gateway") as channel:
        for event in gateway_pb2_grpc.GatewayStub(channel).Generate(request, metadata=metadata):
            last = event
            if args.json:
                print_json(
                    {
                        "request_id": event.request_id,
                        "delta": event.delta,
                        "finish_reason": _finish_name(event.finish_reason),
                        "usage": as_dict(event.usage) if event.HasField("usage") else None,
                        "cost": as_dict(event.cost) if event.HasField("cost") else None,
                    }
                )
            elif event.delta:
                print(event.delta, end="", flush=True)
    if not args.json:
        usage = last.usage
        cost = f"{last.cost.amount} {last.cost.currency}" if last.HasField("cost") else "unknown"
        print(
            f"\n\nrequest_id: {last.request_id}\n"
            f"finish: {_finish_name(last.finish_reason)}  tokens: prompt {usage.prompt_tokens}, "
            f"completion {usage.completion_tokens}, total {usage.total_tokens}  cost: {cost}"
        )
    return 0


def _finish_name(reason: events_pb2.FinishReason.ValueType) -> str | None:
    if reason == events_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return events_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


@dataclass(frozen=True)
class Commands:
    """Registers sub-commands; each area of the CLI adds its own through `register(commands)`."""

    sub: Any

    def add(
        self, name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str, into: Any = None
    ) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = (into or self.sub).add_parser(name, help=help_)
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.set_defaults(handler=handler)
        return command

    def group(self, name: str, help_: str) -> Any:
        """A command with sub-commands, e.g. `sluice audit trail`."""
        return self.sub.add_parser(name, help=help_).add_subparsers(dest=f"{name}_command", required=True)


# Modules with a `register(commands: Commands) -> None`, one per area of the CLI.
EXTENSIONS: tuple[str, ...] = (
    "sluice.cli_prompts",
    "sluice.cli_audit",
    "sluice.cli_redaction",
    "sluice.cli_metering",
    "sluice.cli_keys",
    "sluice.cli_feedback",
    "sluice.cli_ingress",
    "sluice.cli_status",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Event-driven LLM serving on Kafka.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = Commands(parser.add_subparsers(dest="command", required=True))
    add = commands.add

    add("up", cmd_up, "start the local stack in the background")
    add("run", cmd_run, "start the local stack in the foreground (Ctrl-C stops it)")
    add("down", cmd_down, "stop the local stack")
    add(
        "apply",
        cmd_topics_apply,
        "create missing topics and report drift",
        into=commands.group("topics", "manage Kafka topics"),
    )
    serve = add("serve", cmd_serve, "run one service in the foreground")
    serve.add_argument("service", choices=SERVICES)
    gen = add("generate", cmd_generate, "stream an answer from the gateway")
    gen.add_argument("prompt", nargs="*")
    gen.add_argument("--model", default="")
    gen.add_argument("--system", default="")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--user", default="")
    gen.add_argument("--idempotency-key", default="")
    gen.add_argument("--api-key", default="", help="defaults to the local demo tenant's key")
    importlib.import_module("sluice.cli_prompts").add_generate_options(gen)
    for module in EXTENSIONS:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        return int(args.handler(settings, args))
    except ConfigError as exc:
        print(f"sluice: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, StackError) as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"sluice: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


if __name__ == "__main__":
    sys.exit(main())
