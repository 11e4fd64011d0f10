"""Load generator: open-loop Poisson traffic against Sluice (gRPC or Kafka ingress) or any
OpenAI-compatible endpoint, one record per request (docs/loadtest.md)."""

from loadtest.loadgen.grpc_target import GrpcTarget
from loadtest.loadgen.kafka_target import KafkaIngressTarget
from loadtest.loadgen.mix import DEFAULT_PROMPTS, LoadRequest, PromptMix
from loadtest.loadgen.openai_target import OpenAITarget
from loadtest.loadgen.records import OK, RequestRecord, RunResult
from loadtest.loadgen.runner import run_load
from loadtest.loadgen.schedule import poisson_schedule
from loadtest.loadgen.target import Target

__all__ = [
    "DEFAULT_PROMPTS",
    "OK",
    "GrpcTarget",
    "KafkaIngressTarget",
    "LoadRequest",
    "OpenAITarget",
    "PromptMix",
    "RequestRecord",
    "RunResult",
    "Target",
    "poisson_schedule",
    "run_load",
]
