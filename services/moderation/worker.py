"""The two Kafka stages of moderation: input (chat.requests -> chat.moderated) and output
(generation.progress -> released text, notices, cancel, done, history).

Both run inside the shared transactional loop, so what a handler returns is committed together
with the consumed offsets. The output stage needs no state across records: the text is
cumulative and the chunking deterministic. Its small in-memory `RequestMemory` only avoids
re-sending replies that an earlier, committed record already sent, and skips batches that arrive
after a turn was finished; losing it (restart, rebalance) re-sends idempotent, cumulative replies.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Hashable

from colloquy.v1 import chat_pb2, common_pb2, events_pb2, generation_pb2
from google.protobuf import timestamp_pb2

from services.common import events, safety, turns
from services.common.kafka_loop import Consumed
from services.common.topics import CHAT_CANCELS, CHAT_MODERATED, MODERATION_DECISIONS
from services.moderation import metrics, streaming
from services.moderation.categories import CATEGORIES, SYSTEM_PROMPT_LEAK
from services.moderation.domain import Moderator, ScoreCache, Scores
from services.moderation.embedder import TextTooLong
from services.moderation.leak import LeakDetector
from services.moderation.policy import BLOCK, STREAM_FIRST, WARN

log = logging.getLogger(__name__)

STAGE = "moderation"

_HUMAN = {
    "harassment": "harassment", "harassment/threatening": "threats", "hate": "hate",
    "hate/threatening": "threats against a group", "self-harm": "self-harm",
    "self-harm/intent": "self-harm", "self-harm/instructions": "self-harm instructions",
    "sexual": "sexual content", "sexual/minors": "sexual content involving minors",
    "violence": "violence", "violence/graphic": "graphic violence", "illicit": "illegal activity",
    "illicit/violent": "violent wrongdoing", SYSTEM_PROMPT_LEAK: "the assistant's hidden instructions",
}
_FINISH = {
    generation_pb2.FINISH_REASON_STOP: "stop", generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled", generation_pb2.FINISH_REASON_MODERATED: "moderated",
    generation_pb2.FINISH_REASON_ERROR: "error",
}


def flagged_names(result: common_pb2.ModerationResult) -> list[str]:
    """Human names of the flagged categories, most specific first, without repeats."""
    names = [_HUMAN[c] for c in (SYSTEM_PROMPT_LEAK, *reversed(CATEGORIES)) if result.categories.get(c)]
    return list(dict.fromkeys(names))


def notice_text(stage: str, result: common_pb2.ModerationResult) -> str:
    what = ", ".join(flagged_names(result)) or "content our policy restricts"
    if stage == "input":
        text = f"Your message may involve {what}; the assistant will answer within its usage policy."
    elif result.action == BLOCK:
        text = f"The answer was stopped because it may contain {what}."
    else:
        text = f"This answer may contain {what}."
    if safety.needs_crisis_line(result):
        text += " " + safety.CRISIS_LINE
    return text


def out(ev: Consumed, turn: events_pb2.TurnEvent, topic: str, message: object) -> events.OutEvent:
    """Like `ev.out`, with the turn's request id in the headers even if the input record lacked it."""
    produced = ev.out(topic, message)  # type: ignore[arg-type]
    produced.request_id = turn.request_id or ev.request_id
    return produced


def decision(turn: events_pb2.TurnEvent, stage: str,
             result: common_pb2.ModerationResult) -> events_pb2.ModerationDecision:
    return events_pb2.ModerationDecision(request_id=turn.request_id, conversation_id=turn.conversation_id,
                                         stage=stage, result=result, decided_unix_ms=turns.now_ms())


def seed_texts(seed: chat_pb2.ConversationSeed) -> list[str]:
    """Every text of a new conversation's seed: it reaches the model like the message does."""
    texts = [seed.system] if seed.system else []
    for ex in seed.exchanges:
        texts += [t for t in (ex.user, ex.assistant) if t]
    return texts


class InputStage:
    """Moderates the user's message (and a new conversation's seed with it); the prompt stage
    turns a BLOCK into the refusal."""

    def __init__(self, moderator: Moderator) -> None:
        self.moderator = moderator
        self._scored: dict[str, Scores] = {}  # this batch's texts, scored by `prepare`

    def prepare(self, batch: list[events_pb2.TurnEvent]) -> None:
        """Score every text of a polled batch in one call: their encoder runs go to the
        embedder's threads together (each window still runs alone, so a text's scores do not
        depend on its neighbours), where one record at a time kept one core busy. Measured on
        2 cores with 16 chats arriving at once: bench/results/pipeline.md."""
        self._scored = {}
        texts = list(dict.fromkeys(t for turn in batch if not turns.deadline_passed(turn)
                                   for t in (turn.message, *seed_texts(turn.seed))))
        if len(texts) < 2:
            return
        try:
            self._scored = dict(zip(texts, self.moderator.request_scores(texts), strict=True))
        except TextTooLong:  # its record fails on its own in the handler; score the rest there
            self._scored = {}

    def verdict(self, texts: list[str]) -> common_pb2.ModerationResult:
        """One verdict for the message and its seed: the highest score of each category over
        the texts (a non-finite score stays, so the policy fails closed on it)."""
        if all(t in self._scored for t in texts):
            scores = [self._scored[t] for t in texts]
        elif len(texts) == 1:
            return self.moderator.moderate(texts)[0]
        else:
            scores = self.moderator.score_batch(texts)
        if len(scores) == 1:
            return self.moderator.policy.decide(scores[0])
        worst = {c: (math.nan if any(not math.isfinite(s[c]) for s in scores) else max(s[c] for s in scores))
                 for c in scores[0]}
        return self.moderator.policy.decide(worst)

    def handle(self, ev: Consumed[events_pb2.TurnEvent]) -> list[events.OutEvent]:
        turn = ev.message
        if not turn.reply_topic:
            # The first stage after the gateway: nobody could be told about this turn, so it is
            # dead-lettered rather than wedging the partition.
            raise events.PoisonEvent("TurnEvent without reply_topic")
        if turns.deadline_passed(turn):
            return [turns.deadline_error(turn, STAGE, ev.traceparent)]
        started = time.perf_counter()
        texts = [turn.message, *seed_texts(turn.seed)]
        result = self.verdict(texts)
        metrics.observe("input", time.perf_counter() - started, 1, [result])
        moderated = events_pb2.TurnEvent()
        moderated.CopyFrom(turn)
        moderated.input_moderation.CopyFrom(result)
        produced = [out(ev, turn, CHAT_MODERATED.name, moderated),
                    out(ev, turn, MODERATION_DECISIONS.name, decision(turn, "input", result))]
        if result.action == WARN:
            notice = chat_pb2.ModerationNotice(stage="input", result=result, message=notice_text("input", result))
            produced.append(turns.reply(turn, ev.traceparent, moderation=notice))
        return produced


class RequestMemory:
    """What was already sent for one request, and by which record.

    A reply is skipped only when an *earlier record* sent the same value: when a transaction is
    aborted and its records are redone, the record that first sent a value sends it again.
    """

    def __init__(self) -> None:
        self.sent: dict[Hashable, tuple[object, str]] = {}
        self.finished_seq: int | None = None
        self.prompt = ""  # the prompt the model saw: only the first and last batches carry it

    def should_send(self, key: Hashable, value: object, event_id: str) -> bool:
        prev = self.sent.get(key)
        if prev is not None and prev[0] == value and prev[1] != event_id:
            return False
        if prev is None or prev[0] != value:
            self.sent[key] = (value, event_id)
        return True


class Memories:
    """LRU of RequestMemory by request id (thread-safe; one stage thread uses it)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: collections.OrderedDict[str, RequestMemory] = collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, request_id: str) -> RequestMemory:
        with self._lock:
            mem = self._items.get(request_id)
            if mem is None:
                mem = self._items[request_id] = RequestMemory()
                if len(self._items) > self._capacity:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(request_id)
            return mem


@dataclasses.dataclass
class _Candidate:
    index: int
    check: streaming.CandidateCheck
    finish: str
    tokens: int


class OutputStage:
    """Releases checked answer text, cuts flagged answers, and closes the turn.

    The policy's `output.mode` chooses when text is released: once checked (`hold`), or as
    generated (`stream_first`), with a `retraction` reply telling the gateway how much of what
    was released stands when a chunk is blocked. Either way the TurnRecord holds only text whose
    every chunk passed.

    With a `leak` detector (and the policy's `system_prompt_leak` entry), each chunk's verdict
    also carries the system_prompt_leak score of the answer up to that chunk's end.
    """

    def __init__(self, moderator: Moderator, min_chars: int = 64, max_chars: int = 200,
                 cache: ScoreCache | None = None, memories: Memories | None = None,
                 first_chars: int = 0, leak: LeakDetector | None = None) -> None:
        self.moderator = moderator
        self.leak = leak if moderator.policy.leak is not None else None
        self.cache = cache or ScoreCache(moderator)
        self.memories = memories or Memories()
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.first_chars = first_chars

    # -- verdicts --------------------------------------------------------------------------------
    def _verdicts(self, context: str):  # type: ignore[no-untyped-def]
        policy = self.moderator.policy

        def run(windows: list[str], prefixes: list[str]) -> list[common_pb2.ModerationResult]:
            scores = self.cache.scores(windows)
            if context:
                [ctx] = self.cache.request_scores([context])
                [complies] = self.cache.compliance([windows[0]])
                scores = [self.moderator.with_context(s, ctx, complies) for s in scores]
            if self.leak is not None:
                leak = self.leak
                leaks = self.cache.memo("leak", prefixes, lambda ps: [leak.score(p).score for p in ps])
                scores = [{**s, SYSTEM_PROMPT_LEAK: v} for s, v in zip(scores, leaks, strict=True)]
            return [policy.decide(s) for s in scores]

        return run

    def _combine(self, results: list[common_pb2.ModerationResult]) -> common_pb2.ModerationResult:
        """One verdict for a whole answer: the highest score of each category over its chunks."""
        names = [*CATEGORIES, *([SYSTEM_PROMPT_LEAK] if self.leak is not None else [])]
        best = {c: max(r.category_scores[c] for r in results) for c in names}
        return self.moderator.policy.decide(best)

    # -- the handler -----------------------------------------------------------------------------
    def handle(self, ev: Consumed[events_pb2.GenerationProgress]) -> list[events.OutEvent]:
        progress = ev.message
        turn, eid, tp = progress.turn, ev.event_id, ev.traceparent
        mem = self.memories.get(turn.request_id)
        if turn.prompt:
            mem.prompt = turn.prompt
        if mem.finished_seq is not None and progress.seq > mem.finished_seq:
            return []  # a batch generated before generation saw our cancel
        if turns.deadline_passed(turn):
            mem.finished_seq = progress.seq
            return [turns.deadline_error(turn, STAGE, tp),
                    out(ev, turn, CHAT_CANCELS.name, events_pb2.CancelEvent(
                        request_id=turn.request_id, conversation_id=turn.conversation_id, reason="deadline")),
                    # nothing records this turn: free its conversation for the client's retry
                    turns.unanswered(turn.request_id, turn.conversation_id, "DEADLINE_EXCEEDED", STAGE, tp)]

        started = time.perf_counter()
        verdicts = self._verdicts(turn.message)
        policy = self.moderator.policy
        stream_first = policy.output.mode == STREAM_FIRST and not (
            turn.HasField("input_moderation") and policy.suspects_hold(turn.input_moderation))
        produced: list[events.OutEvent] = []
        cands: list[_Candidate] = []
        for c in sorted(progress.candidates, key=lambda c: c.index):
            finished = progress.done or c.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
            check = streaming.check_candidate(c.text, finished, verdicts, self._combine,
                                              self.min_chars, self.max_chars, self.first_chars,
                                              stream_first=stream_first, hold=policy.suspects_hold)
            finish = "moderated" if check.blocked else _FINISH.get(c.finish_reason, "error")
            cands.append(_Candidate(c.index, check, finish, c.tokens))
            produced.extend(self._candidate_events(ev, mem, c.index, check, stream_first))
        metrics.LATENCY.labels("output").observe(time.perf_counter() - started)

        all_complete = all(c.check.complete for c in cands)
        cut = any(c.check.blocked is not None for c in cands)
        if progress.done or (cands and all_complete and cut):
            if not progress.done and mem.should_send("cancel", True, eid):
                produced.append(out(ev, turn, CHAT_CANCELS.name, events_pb2.CancelEvent(
                    request_id=turn.request_id, conversation_id=turn.conversation_id, reason="moderated")))
            if mem.should_send("done", True, eid):
                produced.extend(self._finish(ev, cands, mem.prompt))
            mem.finished_seq = progress.seq
        return produced

    def _candidate_events(self, ev: Consumed[events_pb2.GenerationProgress], mem: RequestMemory,
                          index: int, check: streaming.CandidateCheck,
                          stream_first: bool = False) -> list[events.OutEvent]:
        turn, eid, tp = ev.message.turn, ev.event_id, ev.traceparent
        produced: list[events.OutEvent] = []
        if check.released and mem.should_send(("text", index), len(check.released), eid):
            text = turns.reply(turn, tp, text=events_pb2.ReleasedText(index=index, text=check.released))
            text.at_once = True  # cumulative: sent before the commit, a redo's copy is harmless
            produced.append(text)
        if stream_first and check.blocked is not None and mem.should_send(("retract", index), True, eid):
            # Text past the cut may have been released by earlier records: the gateway withdraws
            # it from the client (and forwards nothing when it never sent past the cut).
            produced.append(turns.reply(turn, tp, retraction=chat_pb2.ChatRetraction(
                index=index, kept_chars=len(check.released))))
        if check.warned is not None and mem.should_send(("warn", index), True, eid):
            asked = turn.input_moderation if turn.HasField("input_moderation") else None
            shown = self.moderator.policy.shows_warning(check.warned, asked)
            metrics.OUTPUT_WARNINGS.labels(str(shown).lower()).inc()
            if shown:
                produced.append(turns.reply(turn, tp, moderation=chat_pb2.ModerationNotice(
                    stage="output", result=check.warned, message=notice_text("output", check.warned),
                    index=index)))
        if check.blocked is not None and mem.should_send(("block", index), True, eid):
            produced.append(turns.reply(turn, tp, moderation=chat_pb2.ModerationNotice(
                stage="output", result=check.blocked, message=notice_text("output", check.blocked),
                index=index)))
        if check.complete and mem.should_send(("decision", index), True, eid):
            verdict = check.blocked or check.overall
            if verdict is not None:
                produced.append(out(ev, turn, MODERATION_DECISIONS.name, decision(turn, "output", verdict)))
                metrics.count_output(ev.message.model_version, verdict)
        return produced

    def _finish(self, ev: Consumed[events_pb2.GenerationProgress],
                cands: list[_Candidate], prompt: str = "") -> list[events.OutEvent]:
        progress = ev.message
        turn = progress.turn
        done = chat_pb2.ChatDone(
            finish_reasons=[chat_pb2.FinishReasonEntry(index=c.index, reason=c.finish) for c in cands],
            usage=common_pb2.Usage(prompt_tokens=progress.prompt_tokens or turn.prompt_tokens,
                                   completion_tokens=sum(c.tokens for c in cands)),
            model_version=progress.model_version, template_version=turn.template_version)
        created = timestamp_pb2.Timestamp()
        created.GetCurrentTime()
        record = events_pb2.TurnRecord(
            conversation_id=turn.conversation_id, user_id=turn.user_id,
            prompt=turn.prompt or prompt,  # kept for feedback (RLHF); never shown in GetConversation
            turn=chat_pb2.Turn(
                index=turn.turn_index, user_message=turn.message, created_at=created,
                answers=[chat_pb2.Answer(index=c.index, text=c.check.released, finish_reason=c.finish)
                         for c in cands],
                model_version=progress.model_version, template_version=turn.template_version,
                request_id=turn.request_id, seed=turn.seed if turn.HasField("seed") else None))
        return [turns.turn_record_event(record, turn.request_id, ev.traceparent),
                turns.reply(turn, ev.traceparent, done=done)]
