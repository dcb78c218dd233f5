"""`guardrt.Guard`: load a checkpoint, moderate conversations, get verdicts with scores.

    guard = Guard.load("tiny-random")          # or a checkpoint directory
    verdict = guard.moderate([{"role": "user", "content": "How do I pick a lock?"}])
    verdict.label, verdict.categories, verdict.unsafe_probability

The torch back end in-process (needs the `torch` extra). `tiny-random` is a generated random
model: it runs the real tokenizer, prompt and image pipeline, and its verdicts are meaningless.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from guardrt.runtime.classify import Classifier, Decode, PreparedRequest
from guardrt.runtime.conversation import parse_messages
from guardrt.runtime.errors import ConfigError, GuardrtError, PromptError, PromptReason
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel, Semantics
from guardrt.runtime.model.tiny import resolve_model
from guardrt.runtime.policy import CategoriesInput, Policy, make_policy
from guardrt.runtime.preprocess import ImageConfig, preprocess_image
from guardrt.runtime.prompt import Messages, prompt_encoder
from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.runtime.verdict import Label, Verdict, VerdictGrammar

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None → float32 on the CPU (bf16 matmuls are slow there), the stored dtype elsewhere."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class Guard:
    """A loaded model with its tokenizer and image settings, ready to moderate."""

    def __init__(
        self,
        model: MllamaModel,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        decode: Decode = "constrained",
        source: str = "",
    ) -> None:
        vision = model.config.vision
        if (image_config.tile_size, image_config.max_tiles) != (
            vision.image_size,
            vision.max_num_tiles,
        ):
            raise ConfigError(
                f"preprocessor tiles {image_config.max_tiles}×{image_config.tile_size}px do not "
                f"match the model's {vision.max_num_tiles}×{vision.image_size}px"
            )
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.classifier = Classifier(model, decode)
        self.source = source
        self._grammar = functools.lru_cache(maxsize=256)(self._make_grammar)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = "tiny-random",
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        semantics: Semantics = "meta",
        decode: Decode = "constrained",
        max_batch: int = 4,
        max_seq: int = 8192,
    ) -> Guard:
        """Load a checkpoint directory (or `tiny-random`, generated on first use).

        `semantics="meta"` runs the model as it was trained; `"transformers"` as transformers
        ≥ 4.56 computes it. `decode="constrained"` reads the scores from one prefill and follows
        the verdict grammar; `"greedy"` generates freely as transformers' `generate` does.
        """
        directory = resolve_model(model)
        torch_device = torch.device(device)
        network = load_model(
            directory,
            device=torch_device,
            dtype=parse_dtype(dtype, torch_device),
            semantics=semantics,
        )
        network.setup_caches(max_batch, max_seq)
        tokenizer = load_tokenizer(directory)
        image_config = ImageConfig.from_preprocessor_config(directory)
        return cls(network, tokenizer, image_config, decode, source=str(directory))

    def _make_grammar(self, policy: Policy) -> VerdictGrammar:
        return VerdictGrammar(self.tokenizer, policy)

    def prepare(
        self,
        messages: Messages,
        *,
        categories: CategoriesInput | None = None,
        excluded_categories: Iterable[str] = (),
    ) -> PreparedRequest:
        """Validate, render, tokenize and tile one request; raises PromptError / ImageError."""
        conversation = parse_messages(messages)
        policy = make_policy(categories, excluded_categories)
        image = None
        if conversation.image is not None:
            if conversation.image.source is None:
                raise PromptError(
                    PromptReason.CONTENT,
                    f"message {conversation.image.message_index} part "
                    f"{conversation.image.part_index} is an image without its 'image' payload",
                )
            source: Any = conversation.image.source  # preprocess_image checks what it is
            image = preprocess_image(source, config=self.image_config)
        prompt = prompt_encoder(self.tokenizer).encode(conversation, policy)
        request = PreparedRequest(tuple(prompt), image, self._grammar(policy))
        self.classifier.check_fits(request)
        return request

    def moderate(
        self,
        messages: Messages,
        *,
        categories: CategoriesInput | None = None,
        excluded_categories: Iterable[str] = (),
    ) -> Verdict:
        """The verdict on the last message of `messages`; invalid input raises a GuardrtError."""
        request = self.prepare(
            messages, categories=categories, excluded_categories=excluded_categories
        )
        return self.classifier.classify([request])[0]

    def moderate_batch(
        self, conversations: Sequence[Messages | Mapping[str, Any]]
    ) -> list[Verdict]:
        """Verdicts for many conversations, batched. Each item is a list of messages or
        `{"messages": [...], "categories": ..., "excluded_categories": [...]}`. An invalid item
        gets an `error` verdict naming the problem; it never fails the others."""
        prepared: list[PreparedRequest | Verdict] = []
        for item in conversations:
            try:
                if isinstance(item, Mapping):
                    prepared.append(
                        self.prepare(
                            item.get("messages"),  # type: ignore[arg-type]
                            categories=item.get("categories"),
                            excluded_categories=item.get("excluded_categories", ()),
                        )
                    )
                else:
                    prepared.append(self.prepare(item))
            except GuardrtError as exc:
                prepared.append(Verdict(Label.ERROR, [], "", str(exc)))
        runnable = [p for p in prepared if isinstance(p, PreparedRequest)]
        results = iter(self.classifier.classify(runnable))
        return [next(results) if isinstance(p, PreparedRequest) else p for p in prepared]
