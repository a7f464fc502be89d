"""Simulated labelers: rank n sampled answers by a transparent rule and submit the ranking.

``python -m rlhf.labelers [--target 127.0.0.1:50051] [--n 3] [--rounds 1] [--limit N] [--questions train]``
(``make rlhf-label``) drives the real gateway like any client: for each question of the training lists of
``rlhf/prompts.yaml`` it is given (``train``, ``train_wide`` or both) it opens a conversation
(``ChatService.Chat`` with ``SamplingParams`` ``n`` > 1 and ``temperature`` > 0), reads the candidates back as
the gateway stored them (``GetConversation``), ranks them with :func:`rlhf.preference.rank` and submits the
ranking, with the answers the rule scores the same marked as ties (``SubmitFeedback``), with the metadata
``x-colloquy-feedback-source: simulated``, so the dataset marks them simulated and ``RLHF_SOURCE=human``
leaves them out. Held-out questions are never labelled. With ``--version V`` (default ``RLHF_ROUND_BASE``,
which the RLHF job's rounds set) only turns answered by model version V are ranked: the labelers first wait
until the gateway answers with V, and skip turns another version answered (a canary's share). These are not
people: they are a rule, named as such everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf.preference import PreferenceWeights, order_of, score, tied_with_next, weights_from_env

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.yaml"
SOURCE_HEADER = ("x-colloquy-feedback-source", "simulated")


TRAINING_LISTS = ("train", "train_wide")


def train_questions(path: Path = PROMPTS_FILE, lists: Sequence[str] = ("train",)) -> list[str]:
    """The questions of the training ``lists`` (of :data:`TRAINING_LISTS`), never the held-out ones."""
    unknown = [name for name in lists if name not in TRAINING_LISTS]
    if unknown or not lists:
        raise ValueError(f"training question lists are {', '.join(TRAINING_LISTS)}; got {', '.join(lists) or 'none'}")
    table = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [q for name in lists for q in table[name]]


class LabelerError(RuntimeError):
    """The labelers cannot do what was asked (e.g. the version to label is not served)."""


@dataclass(frozen=True)
class Labelled:
    """One submitted ranking, for the run's summary."""

    question: str
    conversation_id: str
    turn_index: int
    ranking: list[int]
    scores: list[float]
    feedback_id: str
    tied_with_next: list[bool]


class SimulatedLabeler:
    """A gRPC client of the gateway that ranks candidates by :mod:`rlhf.preference`."""

    def __init__(self, target: str, key: str, n: int = 3, temperature: float = 0.9, max_tokens: int = 64,
                 weights: PreferenceWeights | None = None, timeout: float = 300.0, retries: int = 10,
                 version: str = "") -> None:
        if n < 2:
            raise ValueError("a ranking needs at least 2 candidates (n >= 2)")
        if temperature <= 0:
            raise ValueError("identical greedy candidates rank nothing: temperature must be > 0")
        from services.common import tls

        self.channel = tls.insecure_or_secure_channel(target)
        from colloquy.v1 import chat_pb2_grpc

        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.key = key
        self.n, self.temperature, self.max_tokens = n, temperature, max_tokens
        self.weights = weights or weights_from_env()
        self.timeout = timeout
        self.retries = retries
        self.version = version  # rank only this model version's answers ("" = any)
        self.skipped_versions: dict[str, int] = {}  # turns answered by another version, not ranked

    def close(self) -> None:
        self.channel.close()

    def _metadata(self, feedback: bool = False) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.key}")]
        return [*md, SOURCE_HEADER] if feedback else md

    def _unary(self, method: Any, request: object, *, feedback: bool = False, read_only: bool = False) -> Any:
        """One unary call, repeated while the gateway's rate limit refuses it (RESOURCE_EXHAUSTED is
        answered before any work, so a refused SubmitFeedback was not recorded), waiting the
        ``retry-after`` it names; a read (``read_only``) is also repeated on UNAVAILABLE. Labelling
        160 questions in one go ran into the limit and lost the round (2026-12-03)."""
        import grpc

        for attempt in range(self.retries + 1):
            try:
                return method(request, metadata=self._metadata(feedback=feedback), timeout=self.timeout)
            except grpc.RpcError as exc:
                codes = {grpc.StatusCode.RESOURCE_EXHAUSTED} | ({grpc.StatusCode.UNAVAILABLE} if read_only else set())
                if exc.code() not in codes or attempt == self.retries:
                    raise
                time.sleep(retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    def _ask(self, request: object) -> tuple[str, int]:
        """Run one chat turn to the end; retry when the gateway says to (UNAVAILABLE or
        RESOURCE_EXHAUSTED before the turn started: nothing reached the model)."""
        import grpc

        for attempt in range(self.retries + 1):
            conversation_id, turn_index = "", 0
            try:
                for event in self.stub.Chat(request, metadata=self._metadata(), timeout=self.timeout):
                    if event.WhichOneof("event") == "started":
                        conversation_id, turn_index = event.started.conversation_id, event.started.turn_index
                return conversation_id, turn_index
            except grpc.RpcError as exc:
                retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if conversation_id or not retryable or attempt == self.retries:
                    raise
                time.sleep(retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    def _turn(self, question: str, sampling: Any) -> tuple[str, Any]:
        """Ask once; the conversation id and the turn as the gateway stored it (None if missing)."""
        from colloquy.v1 import chat_pb2

        conversation_id, turn_index = self._ask(chat_pb2.ChatRequest(message=question, sampling=sampling))
        conversation = self._unary(self.stub.GetConversation,
                                   chat_pb2.GetConversationRequest(conversation_id=conversation_id), read_only=True)
        return conversation_id, next((t for t in conversation.turns if t.index == turn_index), None)

    def wait_until_served(self, timeout_s: float, probe: str = "Hello!", pause_s: float = 2.0) -> str:
        """Ask a short probe until the gateway answers with ``self.version`` (a rollout reaches the
        replicas through ``model.updates`` after the registry moved); returns the version seen.
        Raises :class:`LabelerError` naming both versions when ``timeout_s`` passes first."""
        from colloquy.v1 import common_pb2

        deadline = time.monotonic() + timeout_s
        while True:
            _, turn = self._turn(probe, common_pb2.SamplingParams(max_tokens=4))
            seen = turn.model_version if turn is not None else ""
            if not self.version or seen == self.version:
                return seen
            if time.monotonic() >= deadline:
                raise LabelerError(f"the gateway still answers with {seen or 'no version'!r} after {timeout_s:.0f} s, "
                                   f"not {self.version!r}: serve it first (python -m rlhf.job --serve-rounds, "
                                   f"or make promote), or label with --version ''")
            time.sleep(pause_s)

    def label(self, question: str, seed: int | None = None) -> Labelled | None:
        """Ask, rank, submit; None when the turn produced fewer than two answers (e.g. blocked) or
        was answered by another version than ``self.version`` (counted in ``skipped_versions``)."""
        from colloquy.v1 import chat_pb2, common_pb2

        sampling = common_pb2.SamplingParams(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens)
        if seed is not None:
            sampling.seed = seed
        conversation_id, turn = self._turn(question, sampling)
        if turn is None or turn.blocked or len(turn.answers) < 2:
            return None
        if self.version and turn.model_version != self.version:
            self.skipped_versions[turn.model_version] = self.skipped_versions.get(turn.model_version, 0) + 1
            return None
        turn_index = turn.index
        answers = [a.text for a in sorted(turn.answers, key=lambda a: a.index)]
        scores = [score(question, a, self.weights) for a in answers]
        order = order_of(scores)
        ties = tied_with_next(order, scores)
        reply = self._unary(self.stub.SubmitFeedback,
                            chat_pb2.SubmitFeedbackRequest(
                                conversation_id=conversation_id, turn_index=turn_index,
                                ranking=chat_pb2.Ranking(order=order, tied_with_next=ties)),
                            feedback=True)
        return Labelled(question, conversation_id, turn_index, order, [round(s, 4) for s in scores],
                        reply.feedback_id, ties)


def retry_delay(exc: Any, attempt: int) -> float:
    """Seconds to wait before repeating a refused call: the gateway's ``retry-after`` trailer when
    it sent one (plus a little, so the next call lands in the next window), else a growing pause."""
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    try:
        return min(float(trailers["retry-after"]) + 0.1, 30.0)
    except (KeyError, TypeError, ValueError):
        return min(2.0 * (attempt + 1), 10.0)


def run(labeler: SimulatedLabeler, questions: Sequence[str], rounds: int = 1, seed: int = 0) -> list[Labelled]:
    """Label every question ``rounds`` times; returns what was submitted."""
    done = []
    for r in range(rounds):
        for i, question in enumerate(questions):
            result = labeler.label(question, seed=seed + r * len(questions) + i)
            if result is not None:
                done.append(result)
    return done


def default_seed(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """The sampling seed when ``--seed`` is not given: 1000 x the round (``RLHF_ROUND``, set by the
    job's ``--label-command``), else 0. With one seed for every round, each round would ask the same
    served model the same questions with the same seeds, and round 2's new feedback would repeat
    round 1's."""
    raw = environ.get("RLHF_ROUND", "")
    if not raw:
        return 0
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"RLHF_ROUND must be a round number >= 1, got {raw!r}") from None
    if k < 1:
        raise ValueError(f"RLHF_ROUND must be a round number >= 1, got {raw!r}")
    return 1000 * k


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rlhf.labelers``."""
    import grpc
    parser = argparse.ArgumentParser(prog="python -m rlhf.labelers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("COLLOQUY_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--key", default=os.environ.get("COLLOQUY_API_KEY", "colloquy-dev-key"))
    parser.add_argument("--n", type=int, default=3,
                        help="candidates per question (>= 2; over 4 the stack needs CHAT_MAX_N and "
                             "GENERATION_MAX_N raised)")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="times each question is asked")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    parser.add_argument("--questions", default="train",
                        help="comma-separated training lists of rlhf/prompts.yaml to ask, in order: train (40 "
                             "questions), train_wide (the wider set), or train,train_wide")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: 1000 x RLHF_ROUND in a round of the job, else 0)")
    parser.add_argument("--version", default=os.environ.get("RLHF_ROUND_BASE", ""),
                        help="rank only answers of this model version (default RLHF_ROUND_BASE, set in a "
                             "round of the job; '' = any)")
    parser.add_argument("--wait-served", type=float, default=300.0, metavar="S",
                        help="seconds to wait for the gateway to answer with --version before giving up")
    args = parser.parse_args(argv)
    if args.seed is None:
        try:
            args.seed = default_seed()
        except ValueError as exc:
            parser.error(str(exc))
    try:
        questions = train_questions(lists=[name.strip() for name in args.questions.split(",") if name.strip()])
    except ValueError as exc:
        parser.error(str(exc))
    if args.limit:
        questions = questions[: args.limit]
    labeler = SimulatedLabeler(args.target, args.key, args.n, args.temperature, args.max_tokens,
                               version=args.version)
    started = time.perf_counter()
    try:
        if args.version:
            labeler.wait_until_served(args.wait_served)
        done = run(labeler, questions, args.rounds, args.seed)
    except LabelerError as exc:
        print(f"labelers: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        # The labellers' own arguments were refused (e.g. --n over the gateway's CHAT_MAX_N): a
        # message that says which, not a traceback out of the first question.
        print(f"labelers: the gateway refused the labellers' request: {exc.details()}", file=sys.stderr)
        return 2
    finally:
        labeler.close()
    if labeler.skipped_versions:
        print(f"not ranked (answered by another version than {args.version}): {labeler.skipped_versions}",
              file=sys.stderr)
    for item in done:
        print(json.dumps(item.__dict__))
    print(f"simulated labelers submitted {len(done)} rankings in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
