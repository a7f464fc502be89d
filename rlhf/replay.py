"""Replay evaluation: real logged prompts re-run on a candidate and on the served version.

Before a candidate is served, the prompts users actually sent (not the job's held-out
questions) are put to both models again, greedy, through the exported (served) ONNX models
(``rlhf.job.greedy_answers``; plain greedy, without the engine's repetition penalty), and the
two answers of each prompt are judged three ways:

* **the labelers' rule** (:mod:`rlhf.preference`, through :func:`rlhf.evaluation.judge`):
  mean score, the candidate's wins / ties / losses, the rule's terms apart;
* **the reward model** the job trained (:func:`rlhf.evaluation.reward_scores`): means and
  wins. Reported, not gated: PPO trained the candidate to please it;
* **the moderation service** (``ModerationService.Moderate`` over gRPC at ``MODERATION_ADDR``,
  each answer with its user message as context, as output moderation sends it): the share of
  answers whose verdict is BLOCK. When no address is configured or the service does not answer,
  the report says so and has no rate.

**Where the prompts come from.** The conversation store (``services.conversation.db``, the
``turns`` table; ``DATABASE_URL`` or ``CONVERSATION_DB`` as the conversation service reads them):
each turn's ``prompt`` is the ``TurnRecord.prompt`` the prompt stage assembled and the model
saw (hidden instructions, earlier turns, the reminder), with the turn's time, the user's message
and its ``blocked`` flag. The ``conversation.turns`` topic holds the same records (the store is
its materialized view, kept in step by the materializer) but cannot be queried by time; the
feedback dataset holds prompts only of the turns someone rated, a biased sample. A turn input
moderation refused, or of a deleted conversation, is not replayed; identical prompts are
replayed once (greedy answers to one prompt are one answer).

**Simulated traffic.** A turn records no source. The one mark the system writes is on feedback:
the simulated labelers (``rlhf.labelers``) open one conversation per question and submit their
ranking with ``x-colloquy-feedback-source: simulated``, which the feedback dataset keeps in its
``source`` column. ``exclude_simulated`` leaves out every turn of a conversation that has a
``simulated`` row in the dataset. Not caught: a labeler's turn that got no ranking (blocked,
fewer than two answers) and load generators' turns (they submit no feedback).

The selection and the verdict are pure functions (tests/rlhf/test_replay.py); :func:`evaluate`
does the generation, the reward model and the gRPC calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhf import evaluation
from rlhf.preference import score, terms

MODERATION_BATCH = 32  # ModerationService's limit of texts per request
MODERATION_MAX_BYTES = 32 * 1024  # and of one text's UTF-8 bytes


class ReplayError(RuntimeError):
    """The replay cannot read its prompts (no store, an unreadable one)."""


@dataclasses.dataclass(frozen=True)
class LoggedTurn:
    """One recorded turn, as the replay needs it."""

    conversation_id: str
    turn_index: int
    user_message: str
    prompt: str
    created_ms: int
    model_version: str = ""
    blocked: bool = False


@dataclasses.dataclass(frozen=True)
class ReplayWindow:
    """Turns created in ``[since_ms, until_ms)``, the newest ``limit`` distinct prompts."""

    since_ms: int
    until_ms: int
    limit: int
    exclude_simulated: bool = False

    def __post_init__(self) -> None:
        if self.since_ms >= self.until_ms:
            raise ValueError(f"replay window is empty: since {self.since_ms} >= until {self.until_ms} (Unix ms)")
        if self.limit < 1:
            raise ValueError("replay limit must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReplaySet:
    """The prompts chosen for replay, what was left out and why, and the served version."""

    window: ReplayWindow
    turns: list[LoggedTurn]
    counts: dict[str, int]
    served_version: str
    store: str


def parse_time(text: str) -> int:
    """Unix ms of an ISO 8601 time (``2026-12-01T08:00:00Z``; UTC when it names no zone)."""
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-12-01T08:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def window_for(until_ms: int, hours: float, since: str, limit: int, exclude_simulated: bool) -> ReplayWindow:
    """The window ending at ``until_ms``: from ``since`` (ISO 8601) when given, else ``hours`` back."""
    if hours <= 0:
        raise ValueError(f"replay hours must be > 0, not {hours}")
    since_ms = parse_time(since) if since else until_ms - int(hours * 3_600_000)
    if since and since_ms >= until_ms:
        raise ValueError(f"replay since {since} is not before the run's time "
                         f"{dt.datetime.fromtimestamp(until_ms / 1000, dt.UTC).isoformat()}")
    return ReplayWindow(since_ms, until_ms, limit, exclude_simulated)


# ----------------------------------------------------------------- choosing the prompts
def select(turns: Iterable[LoggedTurn], window: ReplayWindow, simulated: set[str]) -> tuple[list[LoggedTurn],
                                                                                              dict[str, int]]:
    """The newest ``window.limit`` distinct prompts of the window, newest first, and how many
    turns each rule left out (``outside_window``, ``blocked``, ``no_prompt``, ``simulated``,
    ``duplicate``, ``over_limit``). ``simulated``: conversation ids of simulated traffic, left
    out only when the window asks."""
    counts = dict.fromkeys(("logged", "outside_window", "blocked", "no_prompt", "simulated", "duplicate",
                            "over_limit", "replayed"), 0)
    chosen: list[LoggedTurn] = []
    seen: set[str] = set()
    for turn in sorted(turns, key=lambda t: (-t.created_ms, t.conversation_id, -t.turn_index)):
        counts["logged"] += 1
        if not window.since_ms <= turn.created_ms < window.until_ms:
            reason = "outside_window"
        elif turn.blocked:
            reason = "blocked"
        elif not turn.prompt.strip():
            reason = "no_prompt"
        elif window.exclude_simulated and turn.conversation_id in simulated:
            reason = "simulated"
        elif turn.prompt in seen:
            reason = "duplicate"
        elif len(chosen) >= window.limit:
            reason = "over_limit"
        else:
            seen.add(turn.prompt)
            chosen.append(turn)
            continue
        counts[reason] += 1
    counts["replayed"] = len(chosen)
    return chosen, counts


def read_turns(db_url: str, window: ReplayWindow) -> list[LoggedTurn]:
    """The store's turns created in the window, of conversations not deleted (read only)."""
    import sqlalchemy as sa
    from colloquy.v1 import chat_pb2

    from services.conversation.db import conversations, make_engine, normalize_url, turns

    url = sa.make_url(normalize_url(db_url))
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        raise ReplayError(f"no conversation store at {url.database} (set DATABASE_URL or CONVERSATION_DB, "
                          "or --replay-store)")
    engine = make_engine(url.render_as_string(hide_password=False), 5000)
    try:
        query = (sa.select(turns.c.conversation_id, turns.c.turn_index, turns.c.user_message, turns.c.prompt,
                           turns.c.created_ms, turns.c.turn)
                 .join(conversations, conversations.c.id == turns.c.conversation_id)
                 .where(conversations.c.deleted_ms.is_(None), turns.c.created_ms >= window.since_ms,
                        turns.c.created_ms < window.until_ms)
                 .order_by(turns.c.created_ms.desc()))
        out: list[LoggedTurn] = []
        with engine.connect() as conn:
            for row in conn.execute(query):
                turn = chat_pb2.Turn.FromString(row.turn)
                out.append(LoggedTurn(row.conversation_id, row.turn_index, row.user_message, row.prompt,
                                      row.created_ms, turn.model_version, turn.blocked))
        return out
    except sa.exc.SQLAlchemyError as exc:
        raise ReplayError(f"cannot read the conversation store {_redact(db_url)}: "
                          f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()


def simulated_conversations(dataset_root: Path) -> set[str]:
    """Conversations with simulated feedback in the feedback dataset (see the module docstring)."""
    from services.feedback import dataset

    return set(dataset.read(dataset_root, "simulated").column("conversation_id").to_pylist())


def prepare(db_url: str, window: ReplayWindow, dataset_root: Path, served_version: str) -> ReplaySet:
    """Read the store and choose the prompts (once per job run; each candidate replays them)."""
    simulated = simulated_conversations(dataset_root) if window.exclude_simulated else set()
    chosen, counts = select(read_turns(db_url, window), window, simulated)
    return ReplaySet(window, chosen, counts, served_version, _redact(db_url))


def _redact(url: str) -> str:
    """The store's URL without a password (it goes into manifests)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ----------------------------------------------------------------- judging
def reward_scorer(parent_hf: Path, reward_model_file: Path,
                  hp: dict[str, Any]) -> Callable[[list[str], list[str]], list[float]] | None:
    """The run's reward model as ``(prompts, answers) -> scores`` (None when the run has none)."""
    if not reward_model_file.is_file():
        return None
    from rlhf.train import Encoder

    rm, offset = evaluation.load_reward_model(parent_hf, reward_model_file)
    enc = Encoder(Path(parent_hf) / "tokenizer.json", hp["max_prompt_tokens"], hp["max_answer_tokens"])
    return lambda prompts, answers: evaluation.reward_scores(rm, offset, enc, prompts, answers)


def rule_summary(questions: Sequence[str], served: Sequence[str], candidate: Sequence[str]) -> dict[str, Any]:
    """The labelers' rule on each prompt's two answers (:func:`rlhf.evaluation.judge`), in the
    replay's words: ``served_*`` and ``candidate_*`` for the judge's parent and child."""
    judged = evaluation.judge(questions, served, candidate, score, terms)
    return _renamed(judged)


def _renamed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k.replace("parent", "served").replace("child", "candidate"): _renamed(v) for k, v in value.items()}
    return value


def reward_summary(served: Sequence[float], candidate: Sequence[float]) -> dict[str, Any]:
    """The reward model's mean score of each side's answers and the candidate's wins / losses."""
    n = len(served)
    wins = sum(c > s for c, s in zip(candidate, served, strict=True))
    losses = sum(c < s for c, s in zip(candidate, served, strict=True))
    return {"served_mean": sum(served) / n if n else None, "candidate_mean": sum(candidate) / n if n else None,
            "candidate_wins": wins, "candidate_losses": losses, "ties": n - wins - losses}


def block_rate(blocked: Sequence[bool]) -> float | None:
    return sum(blocked) / len(blocked) if blocked else None


def moderate(address: str, answers: Sequence[str], contexts: Sequence[str], timeout: float = 60.0) -> list[bool]:
    """Whether the moderation service's verdict on each answer (given its user message, as
    output moderation asks) is BLOCK. An empty answer is not sent and counts as not blocked.
    Raises ``grpc.RpcError`` when the service cannot answer."""
    from colloquy.v1 import common_pb2, moderation_pb2, moderation_pb2_grpc

    from services.common import tls

    def cut(text: str) -> str:
        return text.encode("utf-8")[:MODERATION_MAX_BYTES].decode("utf-8", "ignore")

    blocked = [False] * len(answers)
    todo = [i for i, a in enumerate(answers) if a.strip()]
    with tls.insecure_or_secure_channel(address) as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        for start in range(0, len(todo), MODERATION_BATCH):
            chunk = todo[start:start + MODERATION_BATCH]
            resp = stub.Moderate(moderation_pb2.ModerateRequest(inputs=[cut(answers[i]) for i in chunk],
                                                                contexts=[cut(contexts[i]) for i in chunk]),
                                 timeout=timeout, wait_for_ready=False)
            for i, result in zip(chunk, resp.results, strict=True):
                blocked[i] = result.action == common_pb2.MODERATION_ACTION_BLOCK
    return blocked


def moderation_summary(address: str, questions: Sequence[str], served: Sequence[str],
                       candidate: Sequence[str]) -> dict[str, Any]:
    """Both sides' block rates, or why there are none (no address, the service did not answer)."""
    if not address:
        return {"status": "not configured (MODERATION_ADDR is empty)", "address": "",
                "candidate_block_rate": None, "served_block_rate": None}
    import grpc

    try:
        served_blocked = moderate(address, served, questions)
        candidate_blocked = moderate(address, candidate, questions)
    except grpc.RpcError as exc:
        return {"status": f"not reachable: {exc.code().name} {exc.details()}", "address": address,
                "candidate_block_rate": None, "served_block_rate": None}
    return {"status": "measured", "address": address, "answers": len(served),
            "candidate_blocked": sum(candidate_blocked), "served_blocked": sum(served_blocked),
            "candidate_block_rate": block_rate(candidate_blocked), "served_block_rate": block_rate(served_blocked)}


def verdict(result: dict[str, Any], rule_margin: float, max_block_increase: float) -> tuple[bool, list[str]]:
    """Whether the candidate may be served on the replay's evidence, and every reason it may not:
    no prompts; a mean rule score more than ``rule_margin`` below the served version's; block
    rate not measured, or more than ``max_block_increase`` above the served version's."""
    reasons: list[str] = []
    if not result.get("prompts"):
        reasons.append("no logged prompts in the replay window")
        return False, reasons
    rule = result["rule"]
    if rule["candidate_score_mean"] < rule["served_score_mean"] - rule_margin:
        reasons.append(f"rule score {rule['candidate_score_mean']:.3f} is below the served version's "
                       f"{rule['served_score_mean']:.3f} by more than {rule_margin}")
    mod = result["moderation"]
    if mod.get("candidate_block_rate") is None or mod.get("served_block_rate") is None:
        reasons.append(f"moderation block rate not measured: {mod.get('status')}")
    elif mod["candidate_block_rate"] > mod["served_block_rate"] + max_block_increase:
        reasons.append(f"block rate {mod['candidate_block_rate']:.3f} is above the served version's "
                       f"{mod['served_block_rate']:.3f} by more than {max_block_increase}")
    return not reasons, reasons


def evaluate(replay_set: ReplaySet, candidate_dir: Path, served_dir: Path,
             generate: Callable[[Path, list[str]], list[str]],
             reward: Callable[[list[str], list[str]], list[float]] | None, moderation_addr: str,
             rule_margin: float = 0.0, max_block_increase: float = 0.0) -> dict[str, Any]:
    """Replay ``replay_set`` on both models and judge them; the report's ``replay`` section.

    ``generate(model_dir, prompts)`` gives each prompt's greedy answer; ``reward(prompts, answers)``
    the trained reward model's scores (None: no reward model, reported as such).
    """
    import time

    clock = time.perf_counter()
    prompts = [t.prompt for t in replay_set.turns]
    questions = [t.user_message for t in replay_set.turns]
    result: dict[str, Any] = {"prompts": len(prompts), "window": replay_set.window.as_dict(),
                              "selection": replay_set.counts, "served_version": replay_set.served_version,
                              "store": replay_set.store, "answers": "greedy, exported ONNX models"}
    if not prompts:
        result.update(rule=None, reward=None, moderation=None)
    else:
        served, candidate = generate(served_dir, prompts), generate(candidate_dir, prompts)
        result["rule"] = rule_summary(questions, served, candidate)
        result["reward"] = (reward_summary(reward(prompts, served), reward(prompts, candidate)) if reward
                            else {"status": "no reward model in this run"})
        result["moderation"] = moderation_summary(moderation_addr, questions, served, candidate)
        result["examples"] = [{"question": q[:200], "served": s[:300], "candidate": c[:300]}
                              for q, s, c in list(zip(questions, served, candidate, strict=True))[:6]]
    result["passed"], result["reasons"] = verdict(result, rule_margin, max_block_increase)
    result["seconds"] = time.perf_counter() - clock
    return result
