"""SFT examples for SDAR: chat tokenisation with response-only eligibility, block padding, packing.

* Eligibility: only response (assistant) tokens may be noised; prompt tokens stay clean in both
  copies ("response-only corruption").
* Each example is right-padded to a multiple of the block size with the end token. Those pad tokens
  are eligible by default, as in the released recipe, so the model learns to end inside a block.
* Examples are packed into windows of ``seq_length`` tokens with a greedy knapsack; an example never
  spans two windows. Over-long examples are dropped (counted) or truncated.
* Packing needs every example's length before the first window is written, and windows take
  examples from anywhere in the input: :class:`ExampleSpill` keeps the tokenised examples in a file
  (5 bytes a token) instead of memory, and reads each back when its window is written.
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_sdar.data.inputs import utf8_error


class ExampleError(ValueError):
    """An input example that cannot be used (the message says why)."""


@dataclass
class TokenizedExample:
    tokens: list[int]
    eligible: list[bool]

    def __len__(self) -> int:
        return len(self.tokens)


def example_messages(example: Any) -> list[dict[str, str]]:
    """Normalise an input row (``messages`` list, or ``prompt``/``response``) to chat messages."""
    if not isinstance(example, dict):
        raise ExampleError(f"expected a JSON object, got {type(example).__name__}")
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ExampleError(f"message {i} needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise ExampleError("no assistant message to train on")
        if messages[0]["role"] == "assistant":
            raise ExampleError("the chat starts with the assistant's turn (there is no prompt before it)")
        for i, m in enumerate(messages):
            _check_text(m["content"], f"message {i}")
        return messages
    if "prompt" in example and "response" in example:
        if not isinstance(example["prompt"], str) or not isinstance(example["response"], str):
            raise ExampleError("'prompt' and 'response' must be strings")
        if not example["response"].strip():
            raise ExampleError("empty response")
        _check_text(example["prompt"], "'prompt'")
        _check_text(example["response"], "'response'")
        return [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]},
        ]
    raise ExampleError("expected 'messages' or 'prompt' and 'response' keys")


def _check_text(text: str, where: str) -> None:
    error = utf8_error(text, unit="character")
    if error is not None:
        reason, _, detail = error.partition(" (")
        raise ExampleError(f"{reason} in the text of {where} ({detail}")


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedExample:
    """Tokens of the chat-templated conversation; eligible = tokens of assistant turns.

    The conversation is rendered once per assistant turn: the text up to the turn's generation
    prompt is context, the text the turn adds after it is response. Segments are encoded separately
    and concatenated, so the eligibility boundary falls exactly between segments.
    """
    hf = getattr(tokenizer, "backend", tokenizer)
    if getattr(hf, "chat_template", None) is None:
        raise ExampleError("the tokenizer has no chat template; SFT data needs a chat-templated HF tokenizer")

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # templates raise anything: jinja2 errors, their own raise_exception
            raise ExampleError(f"the chat template fails ({type(err).__name__}: {err})") from None

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True)
        after = render(messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ExampleError("the chat template does not render turns as prefixes of each other")
        segments.append((before[len(done) :], False))
        segments.append((after[len(before) :], True))
        done = after
    tokens: list[int] = []
    eligible: list[bool] = []
    for text, is_response in segments:
        if not text:
            continue
        ids = hf.encode(text, add_special_tokens=False)
        tokens.extend(ids)
        eligible.extend([is_response] * len(ids))
    if not any(eligible):
        raise ExampleError("the response is empty after tokenisation")
    return TokenizedExample(tokens, eligible)


def pad_to_block(
    example: TokenizedExample, block_size: int, pad_id: int, train_pad: bool = True
) -> TokenizedExample:
    """Right-pad to a multiple of ``block_size`` with ``pad_id`` (eligible iff ``train_pad``)."""
    extra = (-len(example.tokens)) % block_size
    return TokenizedExample(example.tokens + [pad_id] * extra, example.eligible + [train_pad] * extra)


def pack_greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy knapsack: fill each window with the longest remaining example that still fits.

    Returns lists of example indices; every length must be in ``[1, capacity]``. Deterministic:
    among examples of equal length the earliest is taken first.
    """
    too_long = [n for n in lengths if n > capacity or n <= 0]
    if too_long:
        raise ValueError(f"cannot pack lengths {too_long[:5]} into windows of {capacity}")
    by_length: dict[int, deque[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, deque()).append(i)
    sizes = sorted(by_length)  # distinct lengths that still have examples
    packs: list[list[int]] = []
    while sizes:
        pack: list[int] = []
        space = capacity
        while True:
            pos = bisect.bisect_right(sizes, space) - 1
            if pos < 0:
                break
            n = sizes[pos]
            queue = by_length[n]
            pack.append(queue.popleft())
            space -= n
            if not queue:
                del sizes[pos]
        packs.append(pack)
    return packs


class ExampleSpill:
    """Tokenised examples appended to a file as they come and read back one at a time by index.

    Each example is stored as its tokens (``int32``) followed by its eligibility (``uint8``); only
    the offsets and lengths stay in memory. :meth:`finish` ends the writing; then ``spill[i]`` gives
    ``(tokens, eligible)`` of example ``i`` as numpy arrays.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.offsets = array("q")
        self.lengths = array("i")
        self._size = 0
        self._file = open(path, "wb")  # closed by finish() or close()
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, tokens: Any, eligible: Any) -> None:
        tokens = np.asarray(tokens, dtype=np.int32)
        eligible = np.asarray(eligible, dtype=np.uint8)
        if tokens.shape != eligible.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and eligibility {eligible.shape} differ")
        self._file.write(tokens.tobytes())
        self._file.write(eligible.tobytes())
        self.offsets.append(self._size)
        self.lengths.append(len(tokens))
        self._size += 5 * len(tokens)

    def finish(self) -> None:
        """Stop appending; examples can be read from now on."""
        self._file.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._fd is None:
            raise RuntimeError("call finish() before reading examples back")
        n = self.lengths[index]
        data = os.pread(self._fd, 5 * n, self.offsets[index])
        if len(data) != 5 * n:
            raise OSError(f"{self.path} is shorter than written: was it changed while in use?")
        return np.frombuffer(data, np.int32, n), np.frombuffer(data, np.uint8, n, offset=4 * n)

    def close(self) -> None:
        self._file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
