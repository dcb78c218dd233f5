"""ModerateStream: checking an assistant answer while it is generated.

Each checkpoint judges the conversation with the answer so far as its last (assistant)
message, exactly as a fresh Moderate of that conversation would, so its scores equal a fresh
request's. A checkpoint falls due every `check_every_tokens` answer tokens (counted as the model
reads the answer, trimmed); the end message asks for the final verdict.

The stream holds an engine cache session: the conversation's K/V (and its image's
cross-attention K/V) stay in a cache slot between checkpoints, and each check re-reads only the
tokens that differ from the previous check's prompt (the new answer tokens, the few at the old
answer's end whose tokenization changed, and the fixed template suffix). When every session
slot is taken, checks run as fresh requests: same answers, more compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from guardrt.runtime.errors import GuardrtError, PromptError, PromptReason
from guardrt.runtime.server.answer_tokens import AnswerTokens
from guardrt.runtime.server.convert import (
    error_verdict,
    messages_from_proto,
    policy_from_proto,
    timing_to_proto,
    verdict_to_proto,
)
from guardrt.runtime.server.service import (
    ModerationInput,
    ModerationResult,
    ModerationService,
    checked_request_id,
)
from guardrt.runtime.server.status import grpc_code, grpc_message
from guardrt.v1 import moderation_pb2 as pb

DEFAULT_CHECK_EVERY = 32


class StreamSession:
    def __init__(
        self,
        service: ModerationService,
        request_id: str,
        base: ModerationInput,
        check_every: int,
        stop_on_unsafe: bool,
        deadline: float | None,
        count: Callable[[ModerationResult | GuardrtError, str], None] = lambda outcome, id_: None,
    ) -> None:
        self.service, self.request_id, self.base = service, request_id, base
        self.check_every, self.stop_on_unsafe, self.deadline = check_every, stop_on_unsafe, deadline
        self.count = count  # each checkpoint's outcome and the stream's id, for metrics and logs
        self.answer = ""
        self.counter = AnswerTokens(service.preparer.tokenizer)  # the answer's tokens, trimmed
        self.tokens = 0
        self.checked_tokens = 0
        self.session = service.scheduler.engine.open_session()

    @classmethod
    async def start(
        cls,
        service: ModerationService,
        start: pb.StreamStart,
        deadline: float | None,
        count: Callable[[ModerationResult | GuardrtError, str], None] = lambda outcome, id_: None,
        caller: str = "",
        trace_id: str = "",
    ) -> StreamSession:
        """Validate the conversation before the answer (it must end with a user message);
        `caller` and `trace_id`: who sent it and the trace it belongs to, for the logs."""
        messages = messages_from_proto(start.messages, service.origins)
        if len(messages) % 2 == 0:
            raise PromptError(
                PromptReason.ROLE,
                f"a stream's conversation must end with a user message; it has {len(messages)} "
                "messages (the answer being checked is the next, assistant, one)",
            )
        categories, excluded, threshold = policy_from_proto(start.policy)
        request_id = checked_request_id(start.request_id)
        base = ModerationInput(
            request_id, messages, categories, excluded, caller=caller, trace_id=trace_id,
            unsafe_threshold=threshold,
        )  # fmt: skip
        base = await service.fetched(base)  # once for the stream, before it holds a cache slot
        session = cls(
            service,
            request_id,
            base,
            start.check_every_tokens or DEFAULT_CHECK_EVERY,
            start.stop_on_unsafe,
            deadline,
            count,
        )
        try:
            await service.prepared(session._with_answer())
        except BaseException:
            session.close()
            raise
        return session

    def close(self) -> None:
        """Give the cache session back (idempotent)."""
        if self.session is not None:
            self.service.scheduler.engine.close_session(self.session)
            self.session = None

    def _with_answer(self) -> ModerationInput:
        answer: Mapping[str, Any] = {"role": "assistant", "content": self.answer}
        return dataclasses.replace(self.base, messages=[*self.base.messages, answer])

    async def append(self, text: str) -> list[pb.StreamResponse]:
        """Add text to the answer; a checkpoint's response when one falls due."""
        self.answer += text
        self.tokens = tokens = self.counter.append(text)
        if tokens - self.checked_tokens < self.check_every:
            return []
        self.checked_tokens = tokens
        response = await self._check(tokens, final=False)
        if self.stop_on_unsafe and response.verdict.label == pb.UNSAFE:
            response.final = True
        return [response]

    async def finish(self) -> pb.StreamResponse:
        return await self._check(self.tokens, final=True)

    async def _check(self, tokens: int, final: bool) -> pb.StreamResponse:
        response = pb.StreamResponse(
            request_id=self.request_id,
            covered_chars=len(self.answer),
            covered_tokens=tokens,
            final=final,
        )
        try:
            # Held, not refused, past a bound on its caller: one check at a time is in flight.
            result = await self.service.moderate(
                self._with_answer(), self.deadline, self.session, hold=True
            )
        except GuardrtError as exc:  # in-band: the stream goes on, the caller sees ERROR
            self.count(exc, self.request_id)
            message = grpc_message(exc, self.request_id)
            response.verdict.CopyFrom(error_verdict(message, grpc_code(exc)))
            return response
        self.count(result, self.request_id)
        response.verdict.CopyFrom(verdict_to_proto(result.verdict))
        response.timing.CopyFrom(timing_to_proto(result.timing))
        response.prompt_tokens = result.prompt_tokens
        response.reused_tokens = result.reused_tokens
        return response
