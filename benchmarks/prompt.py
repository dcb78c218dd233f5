"""Conversation → prompt token ids: guardrt vs the usual render-then-tokenize paths.

Usage: python benchmarks/prompt.py [--repeat N]

Columns: the user text alone through the BPE (the floor: any encoder must tokenize it), guardrt's
`encode_prompt` (validation, cached template parts, user text), the naive path on guardrt's
tokenizer (render the whole prompt, tokenize the whole string), and transformers
(`apply_chat_template(tokenize=True)` with the converter-made fast tokenizer, as a transformers
user runs it). All paths are checked to give the same ids before timing (the texts hold no
special-token spellings, where the naive paths would go wrong). Medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path
from typing import Any

import tiktoken
import transformers

from guardrt.runtime.prompt import encode_prompt, render_prompt
from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.testing.references import converted_tokenizer_json, hf_tokenizer
from guardrt.testing.timing import machine, medians_ms

QUESTION = (
    "My neighbour's dog keeps barking all night and I haven't slept properly in weeks. "
    "What are some things I could do about it, legally or otherwise, to make it stop for "
    "good? I've already tried talking to them twice and they just laughed at me."
)
ANSWER_SENTENCE = (
    "Start by keeping a written log of the dates and times, then contact your local council "
    "or homeowners' association, who can mediate or issue a noise notice; "
)


def cases() -> dict[str, list[dict[str, Any]]]:
    return {
        "prompt classification (~60 words)": [{"role": "user", "content": QUESTION}],
        "response classification (~60 + ~300 words)": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER_SENTENCE * 10},
        ],
        "response classification (~60 + ~3000 words)": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER_SENTENCE * 100},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        hf = hf_tokenizer(converted_tokenizer_json(Path(scratch)))
    print(
        "machine: "
        + machine(f"tiktoken {tiktoken.__version__}", f"transformers {transformers.__version__}")
        + "\n"
    )
    print(
        "| conversation | prompt ids | user-text ids | user text only µs "
        "| guardrt encode_prompt µs | overhead µs | render + whole-string encode µs "
        "| transformers µs | vs transformers |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, messages in cases().items():
        texts = [str(m["content"]) for m in messages]
        ids = encode_prompt(messages, tokenizer=tok)
        rendered_ids = tok.encode_with_specials(render_prompt(messages))
        hf_ids = hf.apply_chat_template(messages_as_parts(messages), tokenize=True)
        hf_ids = (
            hf_ids["input_ids"] if isinstance(hf_ids, dict | transformers.BatchEncoding) else hf_ids
        )
        if not ids == rendered_ids == list(hf_ids):
            raise SystemExit(f"{name}: the paths disagree")
        inner = 200 if len(ids) < 1000 else 20
        times = medians_ms(
            {
                "text": functools.partial(encode_texts, tok, texts),
                "guardrt": functools.partial(encode_prompt, messages, tokenizer=tok),
                "naive": functools.partial(encode_rendered, tok, messages),
                "hf": functools.partial(
                    hf.apply_chat_template, messages_as_parts(messages), tokenize=True
                ),
            },
            args.repeat,
            inner=inner,
        )
        us = {key: value * 1e3 for key, value in times.items()}
        text_ids = sum(len(tok.encode_text(t)) for t in texts)
        print(
            f"| {name} | {len(ids)} | {text_ids} | {us['text']:.0f} | {us['guardrt']:.0f} "
            f"| {us['guardrt'] - us['text']:.0f} | {us['naive']:.0f} | {us['hf']:.0f} "
            f"| {us['hf'] / us['guardrt']:.1f}x |"
        )


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode_text(text) for text in texts]


def encode_rendered(tok: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    return tok.encode_with_specials(render_prompt(messages))


def messages_as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The template reads list content only."""
    return [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages
    ]


if __name__ == "__main__":
    main()
