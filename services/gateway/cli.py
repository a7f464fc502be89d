"""`colloquy chat`: a terminal client for the gateway.

Streams answers as they arrive, keeps the conversation across turns, shows moderation notices,
withdraws text that stream-first moderation retracted (printed text cannot be unprinted, so the
answer is shown again as it stands, with the withdrawn part removed),
and lets the person rate the last answer (/up, /down, /rank 1 0) — the comparison data RLHF uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import grpc
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from services.common import retry_hint, tls

HELP = """commands: /up or /down [comment]  rate the last answer
          /rank i j ...  rank the candidates of the last turn, best first (with --n > 1); i=j: as good as each other
          /new  start a new conversation     /history  show this conversation     /quit"""


def parse_ranking(text: str) -> chat_pb2.Ranking:
    """`/rank`'s arguments: candidate indexes best first, `=` between two that are as good as each
    other ("2 0=1": 2 best, 0 and 1 tied). The gateway checks the order against the turn."""
    order: list[int] = []
    ties: list[bool] = []
    for token in text.split():
        group = token.split("=")
        if not all(part.isdigit() for part in group):
            raise ValueError(f"/rank: {token!r} is not a candidate index (or indexes joined by =)")
        if order:
            ties.append(False)
        ties += [True] * (len(group) - 1)
        order += [int(part) for part in group]
    if not order:
        raise ValueError("/rank: give the candidate indexes best first, e.g. /rank 1 0")
    return chat_pb2.Ranking(order=order, tied_with_next=ties if any(ties) else [])


def _metadata(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def stream_turn(stub: chat_pb2_grpc.ChatServiceStub, key: str, conversation_id: str, text: str,
                sampling: common_pb2.SamplingParams, out=sys.stdout, timeout: float = 300.0,
                retries: int = 3) -> tuple[str, int]:
    """Send one message and print the answer as it streams. Returns (conversation id, turn index).

    A call refused before any event with UNAVAILABLE and a `retry-after` hint (the gateway's
    store still saving the previous turn) is sent again after the hint, up to `retries` times."""
    for attempt in range(retries + 1):
        seen: list[object] = []
        try:
            call = stub.Chat(chat_pb2.ChatRequest(conversation_id=conversation_id, message=text, sampling=sampling),
                             metadata=_metadata(key), timeout=timeout)
            return _print_turn(call, conversation_id, out, seen)
        except grpc.RpcError as err:
            wait = _retry_after(err)
            if seen or attempt == retries or err.code() is not grpc.StatusCode.UNAVAILABLE or wait is None:
                raise
            out.write(f"[{err.details()}: retrying in {wait}s]\n")
            out.flush()
            time.sleep(wait)
    raise AssertionError("unreachable")


def _retry_after(err: grpc.RpcError) -> int | None:
    """The `retry-after` trailer's seconds, if the gateway sent one."""
    trailers = getattr(err, "trailing_metadata", None)  # a failed call's error is also its grpc.Call
    return retry_hint.read(trailers() if trailers else None)


def _print_turn(call: Iterable[chat_pb2.ChatEvent], conversation_id: str, out: TextIO,
                seen: list[object]) -> tuple[str, int]:
    """Print one call's events as they arrive (each also appended to `seen`)."""
    turn_index = 0
    answers: dict[int, str] = {}
    for ev in call:
        seen.append(ev)
        kind = ev.WhichOneof("event")
        if kind == "started":
            conversation_id, turn_index = ev.started.conversation_id, ev.started.turn_index
            out.write("assistant> ")
        elif kind == "delta":
            if ev.delta.index not in answers and ev.delta.index > 0:
                out.write(f"\n[candidate {ev.delta.index}] ")
            answers[ev.delta.index] = answers.get(ev.delta.index, "") + ev.delta.text
            out.write(ev.delta.text)
        elif kind == "retraction":
            index, kept = ev.retraction.index, ev.retraction.kept_chars
            withdrawn = len(answers.get(index, "")) - kept
            answers[index] = answers.get(index, "")[:kept]
            out.write(f"\n[withdrawn by moderation: the last {withdrawn} characters; the answer stands as:]\n"
                      f"{answers[index]}")
        elif kind == "moderation":
            cats = [c for c, hit in ev.moderation.result.categories.items() if hit]
            out.write(f"\n[moderation {ev.moderation.stage}: {ev.moderation.message}"
                      f"{' (' + ', '.join(sorted(cats)) + ')' if cats else ''}]")
        elif kind == "done":
            reasons = ", ".join(f"{r.index}:{r.reason}" for r in ev.done.finish_reasons)
            out.write(f"\n  [turn {turn_index}, {ev.done.usage.completion_tokens} tokens, model "
                      f"{ev.done.model_version or '-'}, finish {reasons}]\n")
        out.flush()
    return conversation_id, turn_index


def chat(args: argparse.Namespace) -> int:
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, n=args.n)
    if args.temperature is not None:  # unset: the served model's default (its manifest's)
        sampling.temperature = args.temperature
    with tls.insecure_or_secure_channel(args.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        conv, last_turn = args.conversation or "", 0
        print(f"Colloquy at {args.target}. {HELP}")
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            try:
                if line in ("/quit", "/exit"):
                    return 0
                if line == "/new":
                    conv, last_turn = "", 0
                    print("(new conversation)")
                elif line == "/history":
                    token = "" if conv else None  # every page of it, oldest turn first
                    while token is not None:
                        c = stub.GetConversation(chat_pb2.GetConversationRequest(
                            conversation_id=conv, page_size=100, page_token=token), metadata=_metadata(args.key))
                        token = c.next_page_token or None
                        for t in c.turns:
                            print(f"  {t.index}. you: {t.user_message}")
                            for a in t.answers:
                                print(f"     assistant[{a.index}]: {a.text}")
                elif line.startswith(("/up", "/down")):
                    parts = line.split(maxsplit=1)
                    fb = chat_pb2.SubmitFeedbackRequest(
                        conversation_id=conv, turn_index=last_turn,
                        rating=chat_pb2.Rating(answer_index=0, thumbs_up=parts[0] == "/up",
                                               comment=parts[1] if len(parts) > 1 else ""))
                    stub.SubmitFeedback(fb, metadata=_metadata(args.key))
                    print("(thanks, rating recorded)")
                elif line.startswith("/rank"):
                    try:
                        ranking = parse_ranking(line[len("/rank"):])
                    except ValueError as exc:
                        print(f"[{exc}]")
                        continue
                    stub.SubmitFeedback(chat_pb2.SubmitFeedbackRequest(
                        conversation_id=conv, turn_index=last_turn, ranking=ranking),
                        metadata=_metadata(args.key))
                    print("(thanks, ranking recorded)")
                elif line.startswith("/"):
                    print(HELP)
                else:
                    conv, last_turn = stream_turn(stub, args.key, conv, line, sampling)
            except grpc.RpcError as err:
                print(f"\n[error {err.code().name}: {err.details()}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="colloquy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat in the terminal")
    c.add_argument("--target", default=os.environ.get("COLLOQUY_TARGET", "127.0.0.1:50051"))
    c.add_argument("--key", default=os.environ.get("COLLOQUY_API_KEY", "colloquy-dev-key"))
    c.add_argument("--conversation", default="")
    c.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the served model's: greedy for SmolLM2)")
    c.add_argument("--max-tokens", type=int, default=200)
    c.add_argument("--n", type=int, default=1)
    args = p.parse_args(argv)
    return chat(args)


if __name__ == "__main__":
    raise SystemExit(main())
