"""Write a run of the job on the real model into ``bench/results/`` (JSON + a short Markdown table),
and the tables the job prints after its rounds (:func:`job_markdown`).

``python -m rlhf.report --run RUN_DIR [--labels LABELS.jsonl --label-seconds S --label-command CMD]
[--machine TEXT] [--out bench/results/rlhf_real]``: ``RUN_DIR`` is the job's run directory
(``<cache>/rlhf/runs/<base>-<source>``, holding ``report.json``); the labelling figures come from
the simulated labelers' output (one JSON line per submitted ranking) and its wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PPO_KEYS = ("step", "reward_mean", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "policy_loss",
            "response_tokens", "ppo_epochs_run", "stopped_at_kl_bound", "step_seconds")


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary(report: dict[str, Any], labels: list[dict[str, Any]], label_seconds: float | None,
            label_command: str, machine: str) -> dict[str, Any]:
    """The figures the issue asks for, from the job's report and the labelling run."""
    ev = report["evaluation"]
    history = report.get("ppo_history") or []
    phases = dict(report.get("phase_seconds") or {})
    kl = ev.get("kl_to_parent") or {}
    out = {
        "machine": machine,
        "parent_version": report["parent_version"], "child_version": report["version"],
        "served_pointer_moved": None,  # filled by main() from the registry
        "labelling": {"command": label_command, "rankings": len(labels), "seconds": label_seconds,
                      "candidates_per_prompt": len(labels[0]["ranking"]) if labels else None},
        "reward_model": {k: report["reward_model"].get(k) for k in (
            "reward_model_accuracy", "heldout_pairs", "reward_model_loss", "reward_model_train_accuracy",
            "train_pairs", "reward_offset", "reward_model_seconds")},
        "ppo_history": [{k: h.get(k) for k in PPO_KEYS} for h in history],
        "heldout": {
            "prompts": ev["prompts"],
            "rule_greedy": {"parent_mean": ev["parent_score_mean"], "child_mean": ev["child_score_mean"],
                            "child_wins": ev["child_wins"], "ties": ev["ties"], "child_losses": ev["child_losses"]},
            "reward_model_greedy": ev.get("greedy_reward_model"),
            "sampled": ev.get("sampled"),
            "kl_to_parent": kl,
            "rule_parts": ev.get("rule_parts"),
        },
        "phase_seconds": {
            "labelling": label_seconds,
            "reward_model": phases.get("reward_model"), "ppo": phases.get("ppo"),
            "train_total_incl_ray": phases.get("train"), "export": phases.get("export"),
            "evaluate": phases.get("evaluate"), "evaluate_parts": ev.get("seconds"),
            "publish": phases.get("publish"), "prepare": phases.get("prepare")},
        "quality_gate": report.get("quality"),  # child fp32 vs the served export's quiz scores
        "hyperparameters": report.get("hyperparameters"),
        "examples": ev.get("examples", [])[:6],
        "replay": report.get("replay"),
    }
    return out


def markdown(s: dict[str, Any]) -> str:
    h = s["heldout"]
    rule, kl, rmg, smp = h["rule_greedy"], h["kl_to_parent"], h["reward_model_greedy"] or {}, h["sampled"] or {}
    rm = s["reward_model"]
    lines = [
        "# RLHF on the real model (smollm2-135m), simulated preference",
        "",
        f"Machine: {s['machine']}. Parent `{s['parent_version']}` -> child `{s['child_version']}` "
        f"(published, not promoted; `generation` pointer moved: {s['served_pointer_moved']}).",
        "",
        "| measure | parent | child |",
        "|---|---|---|",
        f"| rule score, greedy served answers, {h['prompts']} held-out prompts (mean) | "
        f"{_f(rule['parent_mean'])} | {_f(rule['child_mean'])} |",
        f"| reward model score, same greedy answers (mean) | {_f(rmg.get('parent_mean'))} | "
        f"{_f(rmg.get('child_mean'))} |",
        f"| reward model score, sampled answers (mean) | {_f(smp.get('parent_rm_mean'))} | "
        f"{_f(smp.get('child_rm_mean'))} |",
        f"| rule score, sampled answers (mean) | {_f(smp.get('parent_rule_mean'))} | "
        f"{_f(smp.get('child_rule_mean'))} |",
        f"| answer tokens, sampled (mean) | {_f(smp.get('parent_tokens_mean'), 1)} | "
        f"{_f(smp.get('child_tokens_mean'), 1)} |",
        "",
        f"Child vs parent under the rule (greedy, held-out): **{rule['child_wins']} wins / {rule['ties']} ties / "
        f"{rule['child_losses']} losses**.",
        "",
        f"KL(child || parent) on held-out prompts ({kl.get('answers')} sampled answers): "
        f"**{_f(kl.get('kl_per_answer'))} ± {_f(kl.get('kl_per_answer_stderr'))} nats per answer** "
        f"({_f(kl.get('kl_per_token'), 4)} per token); configured bound {_f(kl.get('bound_per_answer'))}: "
        f"within bound = {kl.get('within_bound')}.",
        "",
        f"Reward model: held-out pair accuracy **{_f(rm['reward_model_accuracy'])}** on {rm['heldout_pairs']} pairs "
        f"(chance 0.5); last-epoch train accuracy {_f(rm['reward_model_train_accuracy'])} on {rm['train_pairs']} "
        "pairs.",
        "",
        "## PPO steps",
        "",
        "| step | reward mean | KL to ref | entropy | clip frac | approx KL | value loss | tokens | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["ppo_history"]:
        lines.append(f"| {_f(r['step'], 0)} | {_f(r['reward_mean'])} | {_f(r['kl'])} | {_f(r['entropy'])} | "
                     f"{_f(r['clip_fraction'])} | {_f(r['approx_kl'], 4)} | {_f(r['value_loss'])} | "
                     f"{_f(r['response_tokens'], 1)} | {_f(r['step_seconds'], 0)} |")
    gate = s.get("quality_gate") or {}
    if gate.get("exports"):
        lines += ["", "## Quality gate: the child's float32 weights against its exports", "",
                  "| export | gate score | % | capitals |", "|---|---|---|---|"]
        for name, q in gate["exports"].items():
            caps = q.get("capitals_16") or {}
            lines.append(f"| {name} | {q['score']}/{q['total']} | {_f(q.get('score_pct'), 1)} | "
                         f"{caps.get('score', '-')}/{caps.get('total', '-')} |")
        verdict = gate.get("gate") or {}
        parent = f" and its parent's {verdict['parent_pct']}%" if "parent_pct" in verdict else ""
        lines.append(f"\nServed export: {gate.get('served_export')}; gate "
                     f"{'passed' if verdict.get('passed') else 'FAILED'} (at most "
                     f"{verdict.get('points')} points below the child's fp32{parent}).")
    p = s["phase_seconds"]
    lines += ["", "## Wall time per phase (s)", "", "| phase | seconds |", "|---|---|"]
    for key in ("labelling", "reward_model", "ppo", "train_total_incl_ray", "export", "evaluate", "publish"):
        lines.append(f"| {key} | {_f(p.get(key), 0)} |")
    if h.get("rule_parts"):
        lines += ["", "## The rule's parts (greedy, held-out; unweighted means)", "", *parts_table(h["rule_parts"])]
    if s.get("replay"):
        lines += ["", "## Replay of logged prompts against the served version", "", *replay_table(s["replay"])]
    lines += ["", f"Labelling: `{s['labelling']['command']}` ({s['labelling']['rankings']} rankings of "
              f"{s['labelling']['candidates_per_prompt']} candidates through the real gateway).", ""]
    return "\n".join(lines)


TERMS = ("concise", "on_topic", "full_stop", "repetition", "non_answer", "correct")


def at_best_line(evaluation: dict[str, Any]) -> str:
    """How many held-out answers reach the rule's highest score: the parent's can only be tied, so they
    cap the child's wins."""
    at_best, n = evaluation["at_best"], evaluation["prompts"]
    open_ = n - at_best["parent"]
    return (f"answers at the rule's highest score: parent {at_best['parent']}/{n}, child {at_best['child']}/{n}; "
            f"the child can win at most the other {open_} ({open_ / n:.0%} of the questions)." if n else "")


def parts_table(parts: dict[str, dict[str, float | None]], names: tuple[str, str] = ("parent", "child")) -> list[str]:
    """Each term of the labelers' rule apart, parent vs child: a child that only got shorter
    gains ``concise`` and nothing else."""
    lines = [f"| term | {names[0]} | {names[1]} |", "|---|---|---|"]
    for term in TERMS:
        lines.append(f"| {term} | {_f(parts.get(names[0], {}).get(term))} | {_f(parts.get(names[1], {}).get(term))} |")
    return lines


def _kl(ev: dict[str, Any] | None) -> str:
    kl = (ev or {}).get("kl_to_parent") or {}
    return "-" if kl.get("kl_per_answer") is None else (
        f"{_f(kl['kl_per_answer'])} ({'within' if kl.get('within_bound') else 'OVER'} {_f(kl['bound_per_answer'], 1)})")


def _wtl(ev: dict[str, Any] | None) -> str:
    if not ev:
        return "-"
    return f"{ev['child_wins']}/{ev['ties']}/{ev['child_losses']} ({_f(ev.get('child_win_rate'), 2)})"


def _fidelity(child: dict[str, Any]) -> str:
    """Held-out greedy answers of the served export equal to the child's float32 ones, and the
    layers exported at 8 bit (the trained ones)."""
    quality = child.get("quality") or {}
    fidelity = quality.get("fidelity")
    if not fidelity:
        return "-"
    layers = quality.get("eight_bit_layers") or []
    where = f"; 8-bit layers {min(layers)}-{max(layers)}" if layers else ""
    return f"{fidelity['served_equals_fp32']}/{fidelity['prompts']}{where}"


def _gate(child: dict[str, Any]) -> str:
    """The quality gate's quiz: the served child, its parent (when recorded), and the outcome."""
    gate = (child.get("quality") or {}).get("gate") or {}
    if gate.get("score_pct") is None:
        return "-"
    parent = f" (parent {gate['parent_pct']:.1f})" if gate.get("parent_pct") is not None else ""
    return f"{gate['score_pct']:.1f}{parent}: {'passed' if gate.get('passed') else 'FAILED'}"


def child_row(report: dict[str, Any], child: dict[str, Any]) -> str:
    """One child's row: rule score, wins vs parent and vs the series' base, KL to each, reward
    model accuracy, answer length and time per phase."""
    ev = child["evaluation"]
    origin = child.get("vs_origin") or (ev if report.get("origin_version") == report["parent_version"] else None)
    phases = child["phase_seconds"]
    algorithm = child["algorithm"]
    times = " / ".join(_f(phases.get(k), 0) for k in ("reward_model", algorithm, "export", "evaluate", "publish"))
    rm = report["reward_model"].get("reward_model_accuracy")
    return (f"| {report.get('round', 1)} | {algorithm} | `{child['version']}` | {_f(ev['parent_score_mean'])} -> "
            f"{_f(ev['child_score_mean'])} | {_wtl(ev)} | {_wtl(origin)} | {_kl(ev)} | {_kl(origin)} | {_f(rm)} | "
            f"{_f(ev.get('parent_words_mean'), 1)} -> {_f(ev.get('child_words_mean'), 1)} | "
            f"{_fidelity(child)} | {_gate(child)} | {report.get('labelled_version') or '-'} | "
            f"{_f(report.get('label_seconds'), 0)} | {times} |")


def job_markdown(reports: list[dict[str, Any]]) -> str:
    """The job's own summary of its rounds: one row per child, each child's rule parts, and the
    PPO-vs-DPO comparison of a round that trained both."""
    lines = ["| round | algorithm | child | rule score, held-out (parent -> child) | W/T/L vs parent (win rate) | "
             "W/T/L vs first base | KL to parent (bound) | KL to first base | reward model acc. | "
             "answer words (parent -> child) | served = float32 greedy, held-out | quiz % (gate) | "
             "labels drawn from (served) | label s | RM / train / export / evaluate / publish s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        lines += [child_row(report, child) for child in report["children"].values()]
    for report in reports:
        for child in report["children"].values():
            parts = child["evaluation"].get("rule_parts")
            if parts:
                lines += ["", f"Round {report.get('round', 1)}, {child['algorithm']} child: the rule's parts "
                          "(greedy, held-out, unweighted means)", "", *parts_table(parts)]
            if child["evaluation"].get("at_best"):
                lines += ["", f"Round {report.get('round', 1)}, {child['algorithm']} child: "
                          + at_best_line(child["evaluation"])]
            if child.get("training_quiz"):
                lines += ["", f"Round {report.get('round', 1)}, {child['algorithm']} child: "
                          + training_quiz_line(child["training_quiz"])]
            if child.get("replay"):
                lines += ["", f"Round {report.get('round', 1)}, {child['algorithm']} child: replay of logged prompts "
                          "against the served version", "", *replay_table(child["replay"])]
        if len(report["children"]) > 1:
            lines += ["", f"Round {report.get('round', 1)}: PPO vs DPO on the same held-out prompts", "",
                      *comparison_table(report)]
    return "\n".join(lines)


def training_quiz_line(record: dict[str, Any]) -> str:
    """The quiz checks of a DPO run (``rlhf.quiz``): the parent's score, each checkpoint's, and
    the step kept."""
    parent = record["parent"]
    checks = ", ".join(f"step {c['step']} {_f(c['pct'], 1)}{'' if c['passed'] else ' (out)'}"
                       for c in record["checks"])
    mean = record.get("average")
    kept = mean["instead_of"] if mean and mean["kept"] else record["kept_step"]  # the checkpoint's choice
    last = record["checks"][-1]["step"] if record["checks"] else None
    verdict = (f"kept step {kept}" + (" (the last)" if kept == last else f", not the last ({last})")
               if kept is not None else "no checkpoint within the points: kept the last")
    if mean and mean["kept"]:
        verdict = "kept the mean of the checkpoints' weights (below), not one checkpoint"
    line = (f"quiz during training (float32, within {_f(record['points'], 1)} points of the parent's "
            f"{_f(parent['pct'], 1)}%): {checks}; {verdict}.")
    chosen = record.get("validation")
    if chosen:
        scored = ", ".join(f"step {c['step']} {c['wins']}/{c['ties']}/{c['losses']}" for c in chosen["checks"])
        line += (f" Chosen on {chosen['questions']} validation questions (W/T/L against the parent by the rule, "
                 f"float32 greedy): {scored}" + (f"; step {kept} has the most wins among those within the points."
                                                  if kept is not None else "; none was within the points to choose."))
    if mean:
        scored = mean.get("validation")
        line += (f" The mean of the weights of steps {', '.join(str(s) for s in mean['of_steps'])}: quiz "
                 f"{_f(mean['quiz']['pct'], 1)}" + (f", validation {scored['wins']}/{scored['ties']}/{scored['losses']}"
                                                     if scored else "")
                 + ("; kept instead of one checkpoint." if mean["kept"] else " (out); not kept."))
    expo = record.get("extrapolation")
    if expo:
        tried = ", ".join(
            f"x {t['factor']:g} " + "/".join(str(t["validation"][k]) for k in ("wins", "ties", "losses"))
            + (f" quiz {_f(t['quiz']['pct'], 1)}" if "quiz" in t else "") + ("" if t["passed"] else " (out)")
            for t in expo["tried"])
        factor = expo["kept_factor"]
        line += (f" Extrapolated from the parent (ExPO: parent + factor x (kept - parent); validation W/T/L): {tried}; "
                 + ("kept the weights as trained." if factor == 1.0 else f"kept x {factor:g}."))
    return line


def _utc(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rate(rate: float | None, blocked: int | None, n: int | None) -> str:
    return "not measured" if rate is None else f"{_f(rate)} ({blocked}/{n})"


def replay_table(replay: dict[str, Any]) -> list[str]:
    """The replay section (``rlhf.replay``): rule, reward model and moderation block rate of the
    candidate and the served version on the same logged prompts, then the window and verdict."""
    window = replay["window"]
    lines = [f"{replay['prompts']} logged prompts, turns of {_utc(window['since_ms'])} to {_utc(window['until_ms'])}"
             f" (newest {window['limit']}; simulated traffic "
             f"{'excluded' if window['exclude_simulated'] else 'included'}); left out: "
             + (", ".join(f"{k} {v}" for k, v in replay["selection"].items() if k not in ("logged", "replayed") and v)
                or "none")
             + f" of {replay['selection'].get('logged', 0)} read."]
    if replay["prompts"]:
        rule, mod = replay["rule"], replay["moderation"]
        rm = replay["reward"] or {}
        lines += ["", f"| measure | served `{replay['served_version']}` | candidate |", "|---|---|---|",
                  f"| rule score, greedy (mean) | {_f(rule['served_score_mean'])} | "
                  f"{_f(rule['candidate_score_mean'])} |",
                  f"| candidate wins / ties / losses under the rule | | {rule['candidate_wins']} / {rule['ties']} / "
                  f"{rule['candidate_losses']} |",
                  f"| reward model score (mean) | {_f(rm.get('served_mean'))} | {_f(rm.get('candidate_mean'))} |",
                  f"| moderation block rate of the answers | "
                  f"{_rate(mod.get('served_block_rate'), mod.get('served_blocked'), mod.get('answers'))} | "
                  f"{_rate(mod.get('candidate_block_rate'), mod.get('candidate_blocked'), mod.get('answers'))} |",
                  f"| answer words (mean) | {_f(rule.get('served_words_mean'), 1)} | "
                  f"{_f(rule.get('candidate_words_mean'), 1)} |",
                  "", f"Moderation: {mod['status']}" + (f" ({mod['address']})" if mod.get("address") else "")
                  + (f"; reward model: {rm['status']}" if rm.get("status") else "") + "."]
    verdict = "passed" if replay["passed"] else "FAILED: " + "; ".join(replay["reasons"])
    lines += ["", f"Replay {verdict}."]
    return lines


def comparison_table(report: dict[str, Any]) -> list[str]:
    """PPO and DPO children of the same parent and comparisons: rule win rate, KL, length, time."""
    children = report["children"]
    names = list(children)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, value: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(value(children[n]) for n in names) + " |")

    row("rule score, greedy (mean)", lambda c: _f(c["evaluation"]["child_score_mean"]))
    row("wins/ties/losses vs parent (win rate)", lambda c: _wtl(c["evaluation"]))
    row("KL to parent, nats per answer", lambda c: _kl(c["evaluation"]))
    row("answer words, greedy (mean)", lambda c: _f(c["evaluation"].get("child_words_mean"), 1))
    row("answer tokens, sampled (mean)",
        lambda c: _f((c["evaluation"].get("sampled") or {}).get("child_tokens_mean"), 1))
    row("reward model score, greedy (mean)",
        lambda c: _f((c["evaluation"].get("greedy_reward_model") or {}).get("child_mean")))
    row("training seconds (PPO or DPO, without the reward model)",
        lambda c: _f(c["phase_seconds"].get(c["algorithm"]), 1))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the job's run directory (report.json)")
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--label-seconds", type=float, default=None)
    parser.add_argument("--label-command", default="")
    parser.add_argument("--machine", default="")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended to the .md")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rlhf_real"))
    args = parser.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text(encoding="utf-8"))
    labels = []
    if args.labels:
        labels = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    s = summary(report, labels, args.label_seconds, args.label_command, args.machine)
    from model.registry import Registry

    s["served_pointer_moved"] = Registry().current("generation") != report["parent_version"]
    args.out.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    md = markdown(s)
    if args.notes:
        md += "\n" + args.notes.read_text(encoding="utf-8")
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
