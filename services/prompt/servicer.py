"""PromptService over gRPC: the prompt stage's assembly for direct use, without claiming a turn.

It reads the same history as the stage (owner checked through `user_id`) and reports the index
the next turn would get, but reserves nothing: only a turn that goes through the pipeline is one.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
from colloquy.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc

from services.common import turns
from services.conversation.reader import StoreReader
from services.prompt.config import PromptConfig
from services.prompt.domain import (
    DEFAULT_ANSWER_BUDGET,
    AssembledPrompt,
    Assembler,
    check_message,
    conversation_seed,
    past_turns,
)
from services.prompt.history import HistoryUnavailable, lookup
from services.prompt.pending import ConversationNotFound, TurnTracker
from services.prompt.templates import TemplateSet, UnknownTemplate
from services.tokenizer.domain import InvalidArgument

ROLES = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER,
         "assistant": common_pb2.ROLE_ASSISTANT}


class PromptServicer(prompt_pb2_grpc.PromptServiceServicer):
    def __init__(self, assembler: Assembler, templates: TemplateSet, tracker: TurnTracker,
                 reader: StoreReader, cfg: PromptConfig) -> None:
        self.assembler = assembler
        self.templates = templates
        self.tracker = tracker
        self.reader = reader
        self.cfg = cfg

    async def AssemblePrompt(self, request: prompt_pb2.AssemblePromptRequest,
                             context: grpc.aio.ServicerContext) -> prompt_pb2.AssemblePromptResponse:
        try:
            if request.conversation_id:
                try:
                    uuid.UUID(request.conversation_id)
                except ValueError:
                    raise InvalidArgument("conversation_id", "must be a UUID") from None
            check_message(request.message, self.cfg.max_message_bytes)
            budget = request.answer_budget if request.HasField("answer_budget") else DEFAULT_ANSWER_BUDGET
            try:
                template = self.templates.get(request.template_version)
            except UnknownTemplate as exc:
                raise InvalidArgument("template_version", str(exc)) from None
            recorded: dict = {}
            index = 1
            if request.conversation_id:
                owner, recorded = await asyncio.to_thread(
                    lookup, self.reader, request.conversation_id, request.user_id, self.cfg.history_wait_s)
                index = self.tracker.peek(conversation_id=request.conversation_id,
                                          user_id=request.user_id, owner=owner, recorded=recorded,
                                          now_ms=turns.now_ms())
            system, seeded = conversation_seed(recorded)
            assembled: AssembledPrompt = await asyncio.to_thread(
                self.assembler.assemble, template, seeded + past_turns(recorded.values()), request.message, budget,
                system=system)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ConversationNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, "conversation not found")
        except HistoryUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again")
        return prompt_pb2.AssemblePromptResponse(
            messages=[common_pb2.ChatMessage(role=ROLES[m.role], content=m.content)
                      for m in assembled.messages],
            prompt=assembled.prompt, prompt_tokens=assembled.prompt_tokens,
            dropped_turns=assembled.dropped_turns, template_version=assembled.template_version,
            turn_index=index, answer_stops=template.answer_stops)
