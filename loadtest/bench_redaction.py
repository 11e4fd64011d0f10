"""`make bench-redaction`: detection quality on tests/data and speed on one core.

Prints precision / recall / F1 per entity type and overall on the labelled set
(a prediction counts when it overlaps a gold entity of the same type), the
"leak rate" (gold entities no prediction of any type covers: what would reach
the model in clear), texts/s for ~300-character texts, before (stock Presidio
+ spaCy small, all pipes, one call at a time) and after (Sluice's analyzer,
micro-batched), and the time to first token that the streaming output
redactor adds (p50/p99) at SmolLM2's measured rate of about 77 tokens/s.
Run under `taskset -c 0` for the one-core figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from services.redaction.analyzer import Finding, Redactor
from services.redaction.boundary import boundary_from_settings, job_for, output_redactor
from sluice.config import load_settings

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "redaction_eval.jsonl"
TOKEN_INTERVAL_S = 1 / 77


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def overlaps(a: dict[str, Any] | Finding, b: dict[str, Any] | Finding) -> bool:
    def se(x: Any) -> tuple[int, int]:
        return (x["start"], x["end"]) if isinstance(x, dict) else (x.start, x.end)

    (s1, e1), (s2, e2) = se(a), se(b)
    return s1 < e2 and s2 < e1


def score(rows: list[dict[str, Any]], predictions: list[list[Finding]]) -> dict[str, Any]:
    tp: dict[str, int] = defaultdict(int)
    gold_n: dict[str, int] = defaultdict(int)
    pred_n: dict[str, int] = defaultdict(int)
    pred_ok: dict[str, int] = defaultdict(int)
    leaks = 0
    for row, preds in zip(rows, predictions, strict=True):
        for g in row["entities"]:
            gold_n[g["type"]] += 1
            if any(p.entity_type == g["type"] and overlaps(g, p) for p in preds):
                tp[g["type"]] += 1
            if not any(overlaps(g, p) for p in preds):
                leaks += 1
        for p in preds:
            pred_n[p.entity_type] += 1
            if any(p.entity_type == g["type"] and overlaps(g, p) for g in row["entities"]):
                pred_ok[p.entity_type] += 1
    table = {}
    for kind in sorted(set(gold_n) | set(pred_n)):
        precision = pred_ok[kind] / pred_n[kind] if pred_n[kind] else 0.0
        recall = tp[kind] / gold_n[kind] if gold_n[kind] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[kind] = {
            "gold": gold_n[kind],
            "predicted": pred_n[kind],
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    total_gold, total_pred = sum(gold_n.values()), sum(pred_n.values())
    precision = sum(pred_ok.values()) / total_pred if total_pred else 0.0
    recall = sum(tp.values()) / total_gold
    table["OVERALL"] = {
        "gold": total_gold,
        "predicted": total_pred,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    return {"per_type": table, "leak_rate": leaks / total_gold}


def print_table(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(f"{'entity':16} {'gold':>5} {'pred':>5} {'prec':>6} {'recall':>6} {'f1':>6}")
    for kind, r in result["per_type"].items():
        print(
            f"{kind:16} {r['gold']:5d} {r['predicted']:5d} "
            f"{r['precision']:6.3f} {r['recall']:6.3f} {r['f1']:6.3f}"
        )
    print(f"leak rate (gold entities no finding of any type covers): {result['leak_rate']:.4f}")


def texts_300(rows: list[dict[str, Any]], n: int) -> list[str]:
    """~300-character texts: eval texts joined or trimmed at a word boundary."""
    out: list[str] = []
    buf = ""
    pool = [r["text"].replace("\n", " ") for r in rows if "PRIVATE KEY" not in r["text"]]
    i = 0
    while len(out) < n:
        buf = (buf + " " + pool[i % len(pool)]).strip()
        i += 1
        if len(buf) >= 300:
            cut = buf.rfind(" ", 0, 300)
            out.append(buf[: cut if cut > 250 else 300])
            buf = ""
    return out


def throughput(fn: Any, texts: list[str], repeat: int = 1) -> tuple[float, float]:
    """(texts per wall-clock second, texts per CPU second of this process).

    The CPU figure is the one-core throughput even when other work shares the
    core (this machine is shared); the wall figure is what a caller saw.
    """
    fn(texts[:8])  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn(texts)
    n = repeat * len(texts)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def stock_presidio() -> Any:
    """Presidio as documented, with spaCy small (all pipes); only tldextract is kept offline."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from services.redaction import analyzer as ours

    provider = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": ours.SPACY_MODEL}],
        }
    )
    engine = AnalyzerEngine(nlp_engine=provider.create_engine())
    engine.registry.remove_recognizer("EmailRecognizer")
    engine.registry.add_recognizer(ours._OfflineEmailRecognizer())
    return engine


def ttft_added(boundary: Any, rows: list[dict[str, Any]], streams: int) -> list[float]:
    """Per stream: first released text time minus first token time, tokens arriving at model speed."""
    added = []
    for row in rows[:streams]:
        stream = output_redactor(boundary, "bench", 64)
        pieces = re.findall(r"\s*\S{1,4}", "Sure! " + row["text"])
        first_token = time.perf_counter()
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(TOKEN_INTERVAL_S)
            if stream.push(piece):
                added.append(time.perf_counter() - first_token)
                break
        else:
            stream.finish()
            added.append(time.perf_counter() - first_token)
    return added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    rows = load()
    texts = [r["text"] for r in rows]
    settings = load_settings(state_dir="/tmp/sluice-bench-redaction")
    boundary = boundary_from_settings(settings)
    redactor = Redactor()
    boundary.loaded(redactor)
    policy = boundary.policy("bench")  # the shipped default ("*") policy

    def ours_batched(batch: list[str]) -> list[list[Finding]]:
        # One job per text (as separate requests) in one micro-batch of 64.
        found: list[list[Finding]] = []
        for i in range(0, len(batch), 64):
            jobs = [job_for([t], policy) for t in batch[i : i + 64]]
            found.extend(r[0] for r in redactor.find_many(jobs))
        return found

    def ours_single(batch: list[str]) -> None:
        for t in batch:
            redactor.find_many([job_for([t], policy)])

    print(f"labelled set: {len(rows)} texts, {sum(len(r['entities']) for r in rows)} entities ({DATA.name})")
    predicted = ours_batched(texts)
    print_table("AFTER: Sluice analyzer, shipped default policy", score(rows, predicted))
    hand = [i for i, r in enumerate(rows) if r.get("source") == "hand"]
    print_table(
        f"AFTER, hand-written hard cases only ({len(hand)} texts)",
        score([rows[i] for i in hand], [predicted[i] for i in hand]),
    )
    bench = texts_300(rows, 300)
    print(f"\nspeed texts: {len(bench)}, mean {statistics.mean(map(len, bench)):.0f} chars")
    for label, fn, repeat in (
        ("micro-batched (64/batch)", ours_batched, 2),
        ("one call at a time", ours_single, 1),
    ):
        wall, cpu = throughput(fn, bench, repeat)
        print(f"AFTER  {label:25} {cpu:7.1f} texts/CPU-s  ({wall:.1f} texts/s wall)")
    if not args.skip_baseline:
        stock = stock_presidio()
        stock_pred = [
            [Finding(r.start, r.end, r.entity_type, r.score) for r in stock.analyze(t, language="en")]
            for t in texts
        ]
        print_table("BEFORE: stock Presidio + spaCy small, default recognizers", score(rows, stock_pred))
        print_table(
            "BEFORE, hand-written hard cases only",
            score([rows[i] for i in hand], [stock_pred[i] for i in hand]),
        )
        wall, cpu = throughput(lambda b: [stock.analyze(t, language="en") for t in b], bench)
        print(f"BEFORE {'one call at a time':25} {cpu:7.1f} texts/CPU-s  ({wall:.1f} texts/s wall)")
    added = sorted(ttft_added(boundary, rows, args.streams))
    p50 = statistics.median(added) * 1000
    p99 = added[min(len(added) - 1, int(len(added) * 0.99))] * 1000
    print(
        f"\nstreaming output redactor, TTFT added over {len(added)} streams "
        f"at {1 / TOKEN_INTERVAL_S:.0f} tok/s: "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )


if __name__ == "__main__":
    main()
