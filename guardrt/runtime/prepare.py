"""Messages and a policy in, a `PreparedRequest` out: validation, prompt ids, image tiles.

No torch: the servers run this on worker threads for every back end.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from guardrt.runtime.conversation import parse_messages
from guardrt.runtime.errors import ConfigError, ImageError, PromptError, PromptReason
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.policy import CategoriesInput, Policy, check_threshold, make_policy
from guardrt.runtime.preprocess import ImageConfig, preprocess_image
from guardrt.runtime.prompt import Messages, prompt_encoder
from guardrt.runtime.requests import PreparedRequest, check_fits
from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.runtime.verdict import VerdictGrammar


class Preparer:
    """Everything between a request and the engine, for one tokenizer and image setting."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        max_seq: int,
        decode: str = "constrained",
    ) -> None:
        """`max_seq` and `decode`: the engine's (`for_engine`), what a request must fit."""
        self.tokenizer, self.image_config, self.max_seq = tokenizer, image_config, max_seq
        self.decode = decode
        # Custom policies arrive with requests: the cache is bounded.
        self.grammar = functools.lru_cache(maxsize=256)(self._make_grammar)

    def for_engine(self, max_seq: int, decode: str) -> Preparer:
        """This tokenizer and image setting for an engine of `max_seq` positions (an engine
        directory's own, known once it is loaded) that decodes by `decode`."""
        if (max_seq, decode) == (self.max_seq, self.decode):
            return self
        return Preparer(self.tokenizer, self.image_config, max_seq, decode)

    def _make_grammar(self, policy: Policy) -> VerdictGrammar:
        return VerdictGrammar(self.tokenizer, policy)

    def prepare(
        self,
        messages: Messages,
        *,
        categories: CategoriesInput | None = None,
        excluded_categories: Iterable[str] = (),
        ignored_roles: Collection[str] = (),
        unsafe_threshold: float | None = None,
    ) -> PreparedRequest:
        """Validate, render, tokenize and tile one request; raises PromptError / ImageError.
        Messages of `ignored_roles` are left out (`parse_messages`); `unsafe_threshold`:
        `PreparedRequest.unsafe_threshold`."""
        conversation = parse_messages(messages, ignored_roles=ignored_roles)
        policy = make_policy(categories, excluded_categories)
        threshold = check_threshold(unsafe_threshold)
        image = None
        if conversation.image is not None:
            place = {
                "message": conversation.image.message_index,
                "part": conversation.image.part_index,
            }
            where = "message {message} part {part}".format(**place)
            if conversation.image.source is None:
                raise PromptError(
                    PromptReason.CONTENT, f"{where} is an image without its 'image' payload"
                ).located(**place)
            source: Any = conversation.image.source  # preprocess_image checks what it is
            try:
                image = preprocess_image(source, config=self.image_config)
            except ImageError as exc:  # said where, as every conversation error is
                located = ImageError(exc.reason, f"{where}: {exc}")
                raise located.located(**place) from exc
        encoder = prompt_encoder(self.tokenizer)
        prompt = encoder.encode(conversation, policy)
        # A text-only prompt's head is shared by every request with its policy (prefixes.py).
        prefix = 0 if image is not None else len(encoder.head(conversation, policy))
        request = PreparedRequest(
            tuple(prompt),
            image,
            self.grammar(policy),
            prefix_len=prefix,
            unsafe_threshold=threshold,
        )
        check_fits(request, self.max_seq, self.decode)
        return request


def load_preparer(directory: Path, max_seq: int) -> Preparer:
    """The checkpoint's tokenizer and image settings, checked against the model's tiles."""
    vision = ModelConfig.from_checkpoint(directory).vision
    image_config = ImageConfig.from_preprocessor_config(directory)
    if (image_config.tile_size, image_config.max_tiles) != (
        vision.image_size,
        vision.max_num_tiles,
    ):
        raise ConfigError(
            f"preprocessor tiles {image_config.max_tiles}×{image_config.tile_size}px do not "
            f"match the model's {vision.max_num_tiles}×{vision.image_size}px"
        )
    return Preparer(load_tokenizer(directory), image_config, max_seq)
