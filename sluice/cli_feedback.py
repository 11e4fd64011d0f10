"""`sluice feedback REQUEST_ID --rating +1 …` and `sluice feedback stats`."""

from __future__ import annotations

import argparse

from google.protobuf import json_format

from sluice.cli import Commands, as_dict, demo_key, grpc_channel, print_json
from sluice.config import Settings
from sluice.v1 import feedback_pb2, gateway_pb2, gateway_pb2_grpc

SCALES = {"thumbs": feedback_pb2.RATING_SCALE_THUMBS, "stars": feedback_pb2.RATING_SCALE_STARS}
STATS = "stats"


def cmd_feedback(settings: Settings, args: argparse.Namespace) -> int:
    if args.request_id == STATS:
        return _stats(settings, args)
    if args.rating is None:
        raise SystemExit("sluice feedback: --rating is required (thumbs: -1, 0, +1; stars: 1..5)")
    request = gateway_pb2.SubmitFeedbackRequest(
        request_id=args.request_id,
        scale=SCALES[args.scale],
        rating=args.rating,
        labels=args.label,
        comment=args.comment,
    )
    with grpc_channel(settings, "gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).SubmitFeedback(
            request, metadata=_metadata(settings, args)
        )
    if args.json:
        print_json(as_dict(reply))
    else:
        print(f"feedback {reply.feedback_id} recorded for {args.request_id}")
    return 0


def _stats(settings: Settings, args: argparse.Namespace) -> int:
    request = feedback_pb2.GetFeedbackStatsRequest(tenant=args.tenant, model=args.model)
    with grpc_channel(settings, "gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).GetFeedbackStats(
            request, metadata=_metadata(settings, args)
        )
    if args.json:
        # Every field, zeros included: a 0.0 ratio is an answer, not a missing one.
        rows = [
            json_format.MessageToDict(
                s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for s in reply.stats
        ]
        print_json({"stats": rows})
        return 0
    header = ("tenant", "model", "template", "variant", "ratings", "+", "-")
    print("{:<12} {:<26} {:<24} {:<10} {:>7} {:>5} {:>5}  positive".format(*header))
    for s in reply.stats:
        template = f"{s.template_name}@{s.template_version}" if s.template_name else "-"
        print(
            f"{s.tenant:<12} {s.model:<26} {template:<24} {s.variant or '-':<10} {s.ratings:>7} "
            f"{s.positive:>5} {s.negative:>5}  {s.positive_ratio:.0%}"
        )
    return 0


def _metadata(settings: Settings, args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.api_key or demo_key(settings)}"),)


def register(commands: Commands) -> None:
    feedback = commands.add(
        "feedback",
        cmd_feedback,
        "rate an answer (sluice feedback REQUEST_ID --rating +1), or `sluice feedback stats`",
    )
    feedback.add_argument("request_id", help="the request to rate, or 'stats' for the positive-rating ratios")
    feedback.add_argument("--rating", type=int, help="thumbs: -1, 0 or +1; stars: 1 to 5")
    feedback.add_argument("--scale", choices=sorted(SCALES), default="thumbs", help="default: thumbs")
    feedback.add_argument("--label", action="append", default=[], help="a tag (repeatable), e.g. too-long")
    feedback.add_argument("--comment", default="", help="free text; redacted before it is stored")
    feedback.add_argument("--tenant", default="", help="stats: another tenant (auditor or admin keys)")
    feedback.add_argument("--model", default="", help="stats: only this model")
    feedback.add_argument("--api-key", default="", help="defaults to the local demo tenant's key")
