"""Evaluate moderation on held-out data: ``python -m bench.moderation_eval`` (trains nothing).

Sets: the held-out split of services/moderation/data/policy.jsonl (never used in training), the
separate hand-written holdout_external.jsonl (written before the first training, never tuned on),
data/holdout/external_v2.jsonl (fresh texts written before the second round of data and
classifier changes, frozen by sha256; see its README), and all three together ("combined": the
figures the goals are checked on); beside them data/holdout/plain_v3.jsonl (plain benign texts,
frozen the same way: the false-positive rate on ordinary questions and answers, not in
"combined"), data/holdout/everyday_v6.jsonl (everyday questions whose words brush against harm,
frozen the same way), the answer-quality gate's questions (model/quality_questions.py: a
development set, read) and data/holdout/requests_v4.jsonl (everyday "how do I ... at home" requests for
drugs, weapons, theft and fraud beside look-alikes of the same shape; frozen, not in "combined":
a known weakness measured on its own), like data/holdout/disclosures_v10.jsonl (first-person
disclosures of suicidal thoughts or self-harm in everyday words beside look-alikes of the same shape) and
data/holdout/making_v13.jsonl (requests to make or build something: weapons, drugs, forged papers, malware
beside crafts, toys and science-fair projects in the same words).
Per set: per-category precision/recall/F1, flagged-vs-not
F1, false-positive rate on benign look-alikes, and the category family of flagged harmful texts.
Also: answers judged with the user's message as context (context_pairs.jsonl, and
data/holdout/answers_v5.jsonl: benign answers to harm-sounding questions, the share flagged at all),
alt-profanity-check alone as a baseline on the same texts, and latency per text for a batch of 16
on this CPU (wall p50/p99, CPU time, and the load average, since other processes share the cores).
Writes bench/results/moderation_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from services.moderation import dataset, paths
from services.moderation.categories import CATEGORIES, family
from services.moderation.classifier import Heads
from services.moderation.config import ModerationConfig
from services.moderation.domain import Moderator
from services.moderation.embedder import Embedder
from services.moderation.policy import BLOCK, WARN
from services.moderation.policy import load as load_policy
from services.moderation.profanity import Profanity

RESULTS = Path(__file__).resolve().parent / "results" / "moderation_eval.json"
GOALS = {"flagged_f1": 0.95, "lookalike_fpr": 0.05, "family_accuracy": 0.9, "p50_ms_per_text_batch16": 5.0}


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 3),
            "tp": tp, "fp": fp, "fn": fn}


def evaluate(moderator: Moderator, examples: list[dataset.Example]) -> dict[str, Any]:
    texts = [e.text for e in examples]
    results = []
    for i in range(0, len(texts), 32):
        results.extend(moderator.moderate(texts[i:i + 32]))
    thresholds = {n: moderator.policy.categories[n].threshold for n in CATEGORIES}
    per_cat = {}
    for name in CATEGORIES:
        tp = sum(1 for e, r in zip(examples, results, strict=True) if name in e.labels and r.categories[name])
        fp = sum(1 for e, r in zip(examples, results, strict=True) if name not in e.labels and r.categories[name])
        fn = sum(1 for e, r in zip(examples, results, strict=True) if name in e.labels and not r.categories[name])
        per_cat[name] = {**prf(tp, fp, fn), "positives": tp + fn}
    harmful = [bool(e.labels) for e in examples]
    flagged = [r.flagged for r in results]
    tp = sum(h and f for h, f in zip(harmful, flagged, strict=True))
    fp = sum(f and not h for h, f in zip(harmful, flagged, strict=True))
    fn = sum(h and not f for h, f in zip(harmful, flagged, strict=True))
    look = [r.flagged for e, r in zip(examples, results, strict=True) if e.kind == "lookalike"]
    plain = [r.flagged for e, r in zip(examples, results, strict=True) if e.kind == "benign"]
    fam_hits = []
    errors = []
    for e, r in zip(examples, results, strict=True):
        top = max(CATEGORIES, key=lambda n, r=r: r.category_scores[n] / thresholds[n])
        if e.labels and r.flagged:
            fam_hits.append(family(top) in {family(c) for c in e.labels})
        wrong_family = bool(e.labels) and r.flagged and family(top) not in {family(c) for c in e.labels}
        if bool(e.labels) != r.flagged or wrong_family:
            errors.append({"text": e.text, "labels": sorted(e.labels), "kind": e.kind,
                           "flagged": sorted(n for n in CATEGORIES if r.categories[n]),
                           "action": "block" if r.action == BLOCK else "warn" if r.action == WARN else "allow",
                           "top": top, "top_score": round(r.category_scores[top], 3)})
    f1s = [v["f1"] for v in per_cat.values() if v["positives"]]
    macro = statistics.fmean(f1s) if f1s else None  # None: a set without harmful texts
    return {
        "examples": len(examples), "harmful": sum(harmful), "lookalikes": len(look), "plain_benign": len(plain),
        "flagged": prf(tp, fp, fn),
        "lookalike_false_positive_rate": round(sum(look) / len(look), 3) if look else None,
        "plain_benign_false_positive_rate": round(sum(plain) / len(plain), 3) if plain else None,
        "family_accuracy_among_flagged": round(statistics.fmean(fam_hits), 3) if fam_hits else None,
        "categories_macro_f1": round(macro, 3) if macro is not None else None,
        "categories": per_cat,
        "errors": errors,
    }


def profanity_baseline(examples: list[dataset.Example], profanity: Profanity) -> dict[str, Any]:
    """alt-profanity-check alone (score >= 0.5 means flagged), on the same texts."""
    probs = profanity.predict([e.text for e in examples])
    harmful = [bool(e.labels) for e in examples]
    flagged = [bool(p >= 0.5) for p in probs]
    tp = sum(h and f for h, f in zip(harmful, flagged, strict=True))
    fp = sum(f and not h for h, f in zip(harmful, flagged, strict=True))
    fn = sum(h and not f for h, f in zip(harmful, flagged, strict=True))
    look = [f for e, f in zip(examples, flagged, strict=True) if e.kind == "lookalike"]
    return {"flagged": prf(tp, fp, fn),
            "lookalike_false_positive_rate": round(sum(look) / len(look), 3) if look else None}


def context_eval(moderator: Moderator) -> dict[str, Any]:
    pairs = dataset.load("context_pairs.jsonl")
    with_ctx = moderator.moderate([p.text for p in pairs], [p.context for p in pairs])
    alone = moderator.moderate([p.text for p in pairs])
    def acc(results: list) -> float:  # type: ignore[type-arg]
        return round(statistics.fmean(bool(p.labels) == r.flagged for p, r in zip(pairs, results, strict=True)), 3)
    benign = dataset.load(dataset.ANSWERS_V5)
    answered = moderator.moderate([p.text for p in benign], [p.context for p in benign])
    warned = [r for r in answered if r.flagged]
    return {
        "answers_v5": {"pairs": len(benign), "flagged": len(warned),
                       "flagged_rate": round(len(warned) / len(benign), 3),
                       "categories": sorted({n for r in warned for n in CATEGORIES if r.categories[n]})},
        "pairs": len(pairs), "harmful_requests_answered": sum(bool(p.labels) for p in pairs),
        "accuracy_with_context": acc(with_ctx), "accuracy_answer_alone": acc(alone),
        "errors_with_context": [{"context": p.context, "text": p.text, "labels": sorted(p.labels),
                                 "flagged": sorted(n for n in CATEGORIES if r.categories[n])}
                                for p, r in zip(pairs, with_ctx, strict=True) if bool(p.labels) != r.flagged],
    }


def latency(moderator: Moderator, texts: list[str], repeats: int) -> dict[str, Any]:
    """Milliseconds per text for batches of 16 (the whole Moderate path, rules and policy included)."""
    batch = texts[:16]
    load_start = os.getloadavg()[0]
    for _ in range(3):
        moderator.moderate(batch)
    runs, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        moderator.moderate(batch)
        runs.append((time.perf_counter() - start) * 1000 / len(batch))
        cpu.append((time.process_time() - start_cpu) * 1000 / len(batch))
    runs.sort()

    def pct(q: float) -> float:
        return round(runs[min(len(runs) - 1, round(q * (len(runs) - 1)))], 2)

    return {"batch": len(batch), "repeats": repeats, "p50_ms_per_text": round(statistics.median(runs), 2),
            "p90_ms_per_text": pct(0.9), "p99_ms_per_text": pct(0.99), "min_ms_per_text": round(runs[0], 2),
            # CPU time of this process (all its threads) per text: what the work costs, much less
            # sensitive than wall time to other processes sharing the cores.
            "p50_cpu_ms_per_text": round(statistics.median(cpu), 2),
            "threads": moderator.embedder.threads,
            "mean_chars_per_text": round(statistics.fmean(len(t) for t in batch), 1),
            "cpu_count": os.cpu_count(), "load_average_1m_at_start": round(load_start, 2),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2)}


def quality_questions() -> list[dataset.Example]:
    """The answer-quality gate's questions (model/quality_questions.py) as plain benign examples:
    one the input check flags is one the served assistant refuses or warns on where a right answer
    was expected. A development set, not held out: its flagged questions have been read."""
    from model.quality_questions import QUESTIONS

    return [dataset.Example(text=q, labels=frozenset(), kind="benign", split="heldout")
            for q in dict.fromkeys(q.prompt for q in QUESTIONS)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=ModerationConfig().threads,
                        help="windows embedded at once (0: one per core); default: the service's default")
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                        help="encoder build; the committed heads were trained on int8")
    args = parser.parse_args(argv)

    policy = load_policy(paths.POLICY_FILE)
    heads = Heads.load(paths.CLASSIFIER_FILE)
    embedder = Embedder(threads=args.threads, precision=args.precision)
    profanity = Profanity()
    moderator = Moderator(embedder, heads, policy, profanity)
    heldout = dataset.load(split="heldout")
    external = dataset.load("holdout_external.jsonl")
    fresh = dataset.load(dataset.EXTERNAL_V2)
    sets = {"heldout_split": heldout, "external_holdout": external, "external_v2": fresh,
            "combined": heldout + external + fresh}
    plain = {"plain_v3": dataset.load(dataset.PLAIN_V3), "everyday_v6": dataset.load(dataset.EVERYDAY_V6),
             "quality_questions": quality_questions()}
    apart = {"requests_v4": dataset.load(dataset.REQUESTS_V4), "disclosures_v10": dataset.load(dataset.DISCLOSURES_V10),
             "making_v13": dataset.load(dataset.MAKING_V13)}

    report: dict[str, Any] = {
        "model": moderator.model_id, "policy_version": policy.version, "classifier_version": heads.version,
        "trained_on_examples": heads.meta.get("training", {}).get("examples"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "goals": GOALS,
    }
    for name, examples in {**sets, **apart}.items():
        report[name] = evaluate(moderator, examples)
        report[name]["profanity_check_alone"] = profanity_baseline(examples, profanity)
    for name, examples in plain.items():
        report[name] = evaluate(moderator, examples)
    report["context"] = context_eval(moderator)
    lat_texts = [e.text for e in heldout if e.kind != "benign"][::3]
    lat = latency(moderator, lat_texts, args.repeats)
    # The other thread setting too, for comparison: one per core is faster on idle cores only.
    other = 0 if args.threads == 1 else 1
    lat["threads_" + str(other)] = latency(
        Moderator(Embedder(threads=other, precision=args.precision), heads, policy, profanity),
        lat_texts, args.repeats)
    report["latency"] = lat
    comb = report["combined"]
    report["goals_met"] = {
        "flagged_f1": comb["flagged"]["f1"] >= GOALS["flagged_f1"],
        "lookalike_fpr": comb["lookalike_false_positive_rate"] <= GOALS["lookalike_fpr"],
        "family_accuracy": (comb["family_accuracy_among_flagged"] or 0) >= GOALS["family_accuracy"],
        "p50_ms_per_text_batch16": lat["p50_ms_per_text"] <= GOALS["p50_ms_per_text_batch16"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"moderation eval -> {args.out}   ({moderator.model_id}, policy {policy.version})")
    for name in [*sets, *apart]:
        r = report[name]
        base = r["profanity_check_alone"]
        print(f"  {name:16s} n={r['examples']:3d} flagged F1 {r['flagged']['f1']:.3f} "
              f"(P {r['flagged']['precision']:.3f} R {r['flagged']['recall']:.3f})  look-alike FPR "
              f"{r['lookalike_false_positive_rate']}  family acc {r['family_accuracy_among_flagged']}  "
              f"macro F1 {r['categories_macro_f1']}  | profanity-check alone F1 {base['flagged']['f1']:.3f} "
              f"FPR {base['lookalike_false_positive_rate']}")
    for name in plain:
        r = report[name]
        print(f"  {name:17s} n={r['examples']:3d} plain benign FPR {r['plain_benign_false_positive_rate']} "
              f"(flagged: {[(e['action'], e['text'][:48]) for e in r['errors']]})")
    ctx = report["context"]
    print(f"  context pairs    n={ctx['pairs']} accuracy with context {ctx['accuracy_with_context']} "
          f"(answer alone {ctx['accuracy_answer_alone']})")
    a5 = ctx["answers_v5"]
    print(f"  answers_v5       n={a5['pairs']} benign answers flagged with their question {a5['flagged']} "
          f"({a5['flagged_rate']}; categories {a5['categories']})")
    for t in [lat, lat["threads_" + str(other)]]:
        if t:
            tag = f" {t['threads'] or 'n'} thr"
            print(f"  latency{tag:9s} p50 {t['p50_ms_per_text']} ms/text wall, p99 {t['p99_ms_per_text']}, "
                  f"{t['p50_cpu_ms_per_text']} ms CPU, min {t['min_ms_per_text']} (batch 16, "
                  f"load avg {t['load_average_1m_at_start']}->{t['load_average_1m_at_end']} on {t['cpu_count']} CPUs)")
    print(f"  goals met: {report['goals_met']}")
    print("  combined, per category:")
    for name in CATEGORIES:
        c = report["combined"]["categories"][name]
        print(f"    {name:24s} P {c['precision']:.3f} R {c['recall']:.3f} F1 {c['f1']:.3f} (n={c['positives']})")


if __name__ == "__main__":
    main()
