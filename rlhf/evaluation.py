"""The job's evaluation of a child version against its parent on held-out prompts.

Held-out questions (``rlhf/prompts.yaml``: never labelled, never a PPO prompt) are put to both
models in the layout the service gives a fresh conversation (:func:`served_prompt`: the prompt
template's hidden instructions around the question), and measured three ways:

* **the rule** (:mod:`rlhf.preference`, the simulated labelers' own judge) on each model's
  greedy answer through the exported (served) ONNX models, plain greedy: without the served
  engine's repetition penalty and copy guard (bench/results/rlhf_rounds_real.md, 2026-12-06 12:42,
  judges both ways): mean score and the child's
  wins / ties / losses, each of the rule's terms apart, and answer length (:func:`judge`).
  The reward model alone can be gamed; the rule cannot
  be, by construction, since PPO never saw it;
* **the reward model** the run trained, on the same greedy answers and on answers sampled as
  PPO samples (temperature ``RLHF_TEMPERATURE``), parent vs child;
* **KL(child || parent)** per answer, estimated on answers sampled from the child: the mean
  over samples of ``log pi_child(y|x) - log pi_parent(y|x)`` summed over the answer's tokens
  (:func:`sequence_kl`), compared with the configured bound ``RLHF_KL_BOUND``
  (:func:`kl_summary`).

The pure functions here are unit-tested (tests/rlhf/test_evaluation.py); :func:`sampled` needs
the float32 weights of both models and the reward model checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.chat_template import render_chatml
from rlhf.preference import words

REPO = Path(__file__).resolve().parent.parent
TEMPLATES_FILE = REPO / "services" / "prompt" / "templates.yaml"


# ----------------------------------------------------------------- prompts
def served_prompt(question: str, before: str, after: str = "", after_placement: str = "append") -> str:
    """A fresh conversation's first prompt as the prompt service assembles it: the ``before``
    system message, the question with the ``after`` reminder appended after a blank line (or,
    with ``after_placement`` ``system``, as a system message after it), then the assistant header."""
    user = f"{question}\n\n{after}" if after and after_placement == "append" else question
    messages = [{"role": "system", "content": before}, {"role": "user", "content": user}]
    if after and after_placement == "system":
        messages.append({"role": "system", "content": after})
    return render_chatml(messages, add_generation_prompt=True)


def served_prompts(questions: Sequence[str], templates_file: Path = TEMPLATES_FILE) -> tuple[list[str], str]:
    """Every question in the current prompt template's layout; returns (prompts, template version)."""
    from services.prompt.templates import load_file

    template = load_file(templates_file).get()
    return ([served_prompt(q, template.before, template.after, template.after_placement) for q in questions],
            template.version)


# ----------------------------------------------------------------- pure summaries
def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge(questions: Sequence[str], parent: Sequence[str], child: Sequence[str],
          score: Callable[[str, str], float],
          parts: Callable[[str, str], dict[str, float]] | None = None,
          best: Callable[[str], float] | None = None) -> dict[str, Any]:
    """Score each question's parent and child answer; means and the child's wins / ties / losses.

    With ``parts`` (the rule's unweighted terms, :func:`rlhf.preference.terms`), also each term's
    mean for parent and child, so a child that won only by getting shorter shows as such; the
    mean answer length in words is there either way. With ``best`` (a question's highest possible
    score, :func:`rlhf.preference.best_score`), ``at_best`` counts the answers that reach it: the
    parent's are questions the child can at most tie.
    """
    parent_scores = [score(q, a) for q, a in zip(questions, parent, strict=True)]
    child_scores = [score(q, a) for q, a in zip(questions, child, strict=True)]
    wins = sum(c > p for c, p in zip(child_scores, parent_scores, strict=True))
    losses = sum(c < p for c, p in zip(child_scores, parent_scores, strict=True))
    n = len(questions)
    out: dict[str, Any] = {
        "prompts": n, "parent_score_mean": _mean(parent_scores), "child_score_mean": _mean(child_scores),
        "child_wins": wins, "child_losses": losses, "ties": n - wins - losses,
        "child_win_rate": wins / n if n else None,
        "parent_words_mean": _mean([len(words(a)) for a in parent]),
        "child_words_mean": _mean([len(words(a)) for a in child]),
        "parent_scores": [round(s, 4) for s in parent_scores],
        "child_scores": [round(s, 4) for s in child_scores]}
    if best is not None:
        tops = [best(q) for q in questions]
        out["at_best"] = {name: sum(s >= t - 1e-9 for s, t in zip(scores, tops, strict=True))
                          for name, scores in (("parent", parent_scores), ("child", child_scores))}
    if parts is not None:
        out["rule_parts"] = {name: term_means([parts(q, a) for q, a in zip(questions, answers, strict=True)])
                             for name, answers in (("parent", parent), ("child", child))}
    return out


def term_means(rows: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """The mean of each term over answers (the keys of the first row)."""
    return {key: _mean([r[key] for r in rows]) for key in (rows[0] if rows else {})}


def sequence_kl(logprobs: Any, ref_logprobs: Any, mask: Any) -> Any:
    """Per answer, ``sum_t mask * (logp - ref_logp)``: the sample estimate of KL(policy || ref)
    of one answer drawn from the policy ([B, T] tensors -> [B])."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def kl_summary(per_answer: Sequence[float], tokens: Sequence[float], bound: float) -> dict[str, Any]:
    """Mean KL per answer (with its standard error) and per token, and whether the mean is
    inside ``bound`` (nats per answer)."""
    n = len(per_answer)
    mean = _mean(per_answer)
    stderr = None
    if n > 1 and mean is not None:
        stderr = math.sqrt(sum((k - mean) ** 2 for k in per_answer) / (n - 1) / n)
    total_tokens = sum(tokens)
    return {"answers": n, "kl_per_answer": mean, "kl_per_answer_stderr": stderr,
            "kl_per_token": sum(per_answer) / total_tokens if total_tokens else None,
            "bound_per_answer": bound, "within_bound": mean is not None and mean <= bound}


# ----------------------------------------------------------------- torch
def _response_logprobs(lm: Any, seq: Any, attn: Any, width: int, response: Any) -> Any:
    from rlhf import ppo
    from rlhf.reward import position_ids

    hidden = lm.model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn),
                      use_cache=False).last_hidden_state
    logits = lm.lm_head(hidden[:, width - 1:-1]).float()
    return ppo.logprobs_from_logits(logits, response)


def load_reward_model(parent_hf: Path, reward_model_file: Path) -> tuple[Any, float]:
    """The reward model a run trained (``RM_CHECKPOINT`` on the parent's float32 architecture), in
    eval mode, and the offset its scores are reported relative to."""
    import torch

    from rlhf.reward import RewardModel
    from rlhf.train import load_lm

    saved = torch.load(reward_model_file, map_location="cpu", weights_only=False)
    rm = RewardModel.from_causal_lm(load_lm(Path(parent_hf)))
    rm.load_state_dict(saved["state"])
    rm.eval()
    return rm, float(saved["metrics"].get("reward_offset", 0.0))


def reward_scores(rm: Any, offset: float, enc: Any, prompts: Sequence[str], answers: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """The reward model's score (minus ``offset``) of each answer to its prompt (``enc``: the run's
    ``rlhf.train.Encoder``, which cuts long prompts from the left)."""
    import torch

    from rlhf.train import comparison_batch

    items = [{"prompt": p, "answers": [a], "pairs": []} for p, a in zip(prompts, answers, strict=True)]
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            ids, mask, _ = comparison_batch(items[start:start + batch_size], enc)
            out.extend((rm(ids, mask) - offset).tolist())
    return out


def sampled(parent_hf: Path, child_hf: Path, reward_model_file: Path, prompts: Sequence[str],
            questions: Sequence[str], greedy: dict[str, Sequence[str]], hp: dict[str, Any], samples: int,
            bound: float, batch_size: int = 16) -> dict[str, Any]:
    """Reward model and KL measurements with the float32 weights (see the module docstring).

    ``greedy`` holds the served (ONNX) greedy answers, ``{"parent": [...], "child": [...]}``,
    scored by the reward model here; ``samples`` answers per prompt are drawn from each model
    with the PPO sampling settings of ``hp`` and scored by the reward model and by the rule;
    the child's samples give the KL estimate.
    """
    import torch

    from rlhf import preference
    from rlhf.train import Encoder, load_lm, sample_answers, with_final_eos

    enc = Encoder(Path(child_hf) / "tokenizer.json", hp["max_prompt_tokens"], hp["max_answer_tokens"])
    parent = load_lm(Path(parent_hf)).eval()
    child = load_lm(Path(child_hf)).eval()
    rm, offset = load_reward_model(parent_hf, reward_model_file)

    def rm_text(answers: Sequence[str]) -> list[float]:
        return reward_scores(rm, offset, enc, prompts, answers, batch_size)

    result: dict[str, Any] = {"reward_offset": offset, "samples_per_prompt": samples,
                              "temperature": hp["temperature"], "max_new_tokens": hp["max_new_tokens"]}
    greedy_rm = {name: rm_text(answers) for name, answers in greedy.items()}
    result["greedy_reward_model"] = {f"{name}_mean": _mean(scores) for name, scores in greedy_rm.items()}
    if "parent" in greedy_rm and "child" in greedy_rm:
        result["greedy_reward_model"]["child_wins"] = sum(
            c > p for c, p in zip(greedy_rm["child"], greedy_rm["parent"], strict=True))

    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    torch.manual_seed(int(hp.get("seed", 0)) + 12345)
    per_model: dict[str, dict[str, list[float]]] = {}
    kl_answers: list[float] = []
    kl_tokens: list[float] = []
    for name, lm in (("parent", parent), ("child", child)):
        stats: dict[str, list[float]] = {"rm": [], "rule": [], "tokens": []}
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            with torch.no_grad():
                out, attn, response, rmask, width = sample_answers(lm, [p for _, p in chunk], enc, hp)
                stats["rm"].extend((rm(*with_final_eos(out, attn, rmask, enc.eos)) - offset).tolist())
                stats["tokens"].extend(rmask.sum(1).float().tolist())
                if name == "child":
                    kl = sequence_kl(_response_logprobs(child, out, attn, width, response),
                                     _response_logprobs(parent, out, attn, width, response), rmask)
                    kl_answers.extend(kl.tolist())
                    kl_tokens.extend(rmask.sum(1).float().tolist())
            for (i, _), row, m in zip(chunk, response, rmask, strict=True):
                text = enc.decode(row[: int(m.sum())].tolist())
                stats["rule"].append(preference.score(questions[i], text))
        per_model[name] = stats
    result["sampled"] = {
        f"{name}_{key}_mean": _mean(stats[key]) for name, stats in per_model.items()
        for key in ("rm", "rule", "tokens")}
    result["kl_to_parent"] = kl_summary(kl_answers, kl_tokens, bound)
    return result
