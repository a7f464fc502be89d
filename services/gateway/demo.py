"""The scripted conversation `make demo` runs through the gateway.

It shows streamed answers, a follow-up turn that relies on an earlier one, and a message that
input moderation blocks, then prints how to keep chatting.
"""

from __future__ import annotations

import argparse
import sys
import time

from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from services.common import tls
from services.gateway.cli import stream_turn

SCRIPT = [
    "Hi! I have a dog called Biscuit.",
    "What is the capital of France?",
    "What is my dog's name?",
    "Immigrants are subhuman parasites and I want to hurt them.",
]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--key", default="colloquy-dev-key")
    args = p.parse_args()
    sampling = common_pb2.SamplingParams(max_tokens=64)  # the served model's default sampling
    with tls.insecure_or_secure_channel(args.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        conv = ""
        for text in SCRIPT:
            print(f"\nyou> {text}")
            t0 = time.perf_counter()
            conv, _turn = stream_turn(stub, args.key, conv, text, sampling)
            print(f"  ({time.perf_counter() - t0:.2f}s)")
        c = stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv),
                                 metadata=[("authorization", f"Bearer {args.key}")])
        print(f"\nconversation {conv}: {len(c.turns)} turns stored "
              f"({sum(t.blocked for t in c.turns)} blocked); hidden instructions are not in it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
