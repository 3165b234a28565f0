"""SFT data: response-only eligibility, block padding, greedy packing, stored windows."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.data.sft import (
    ExampleError,
    TokenizedExample,
    example_messages,
    pack_greedy,
    pad_to_block,
    tokenize_chat,
)
from megatron_sdar.data.sft_windows import SFTWindowDataset
from megatron_sdar.data.tokenizer import load_tokenizer
from tools import preprocess_sft

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["what is two plus two", "the answer is four", "user assistant system", "hello there"] * 30
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat")
    fast.save_pretrained(out)
    return str(out)


def test_response_only_eligibility(chat_tokenizer_dir):
    tok = load_tokenizer(chat_tokenizer_dir)
    messages = [
        {"role": "system", "content": "hello there"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "the answer is four"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "four"},
    ]
    ex = tokenize_chat(tok, messages)
    full = tok.backend.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.tokens) == full
    trained = "".join(tok.decode([t]) for t, e in zip(ex.tokens, ex.eligible) if e)
    assert trained == "the answer is four<|im_end|>\nfour<|im_end|>\n"
    prompt = "".join(tok.decode([t]) for t, e in zip(ex.tokens, ex.eligible) if not e)
    assert "what is two plus two" in prompt and "answer" not in prompt


def test_bad_examples_raise():
    for row, msg in [
        ([1], "JSON object"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant"),
        ({"prompt": "x", "response": " "}, "empty response"),
        ({"text": "x"}, "expected 'messages'"),
        ({"messages": [{"role": "user"}]}, "message 0"),
    ]:
        with pytest.raises(ExampleError, match=msg):
            example_messages(row)


def test_pad_to_block():
    ex = TokenizedExample([5, 6, 7, 8, 9], [False, False, True, True, True])
    padded = pad_to_block(ex, 4, pad_id=1)
    assert padded.tokens == [5, 6, 7, 8, 9, 1, 1, 1] and padded.eligible[5:] == [True] * 3
    assert pad_to_block(ex, 4, pad_id=1, train_pad=False).eligible[5:] == [False] * 3
    assert pad_to_block(TokenizedExample([1] * 8, [True] * 8), 4, 0).tokens == [1] * 8


def test_pack_greedy_invariants():
    rng = random.Random(0)
    lengths = [rng.choice([4, 8, 12, 64, 100, 128]) for _ in range(500)]
    packs = pack_greedy(lengths, 128)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    assert pack_greedy(lengths, 128) == packs
    lower_bound = -(-sum(lengths) // 128)
    assert len(packs) <= lower_bound * 1.05 + 1
    with pytest.raises(ValueError, match="cannot pack"):
        pack_greedy([10, 200], 128)


def write_chat(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_preprocess_sft_round_trip(tmp_path, chat_tokenizer_dir):
    rows = [
        {"prompt": "what is two plus two", "response": "the answer is four"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]},
        "{bad json",
        {"prompt": "hello", "response": "the answer is four " * 10},  # longer than a window
        {"prompt": "hello", "response": "four"},
    ]
    src = tmp_path / "chat.jsonl"
    write_chat(src, rows)
    prefix = tmp_path / "sft"
    summary = preprocess_sft.main(
        ["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--output-prefix", str(prefix),
         "--seq-length", "48", "--block-size", "4"]
    )  # fmt: skip
    assert summary["examples"] == 3 and summary["dropped"] == 1
    assert summary["too_long"] == {"too long (dropped)": 1}
    tok = load_tokenizer(chat_tokenizer_dir)
    ds = SFTWindowDataset(str(prefix), seq_length=48, pad_id=tok.eod_id)
    assert len(ds) == summary["windows"]
    seen_examples = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].shape == (48,)
        docs = s["doc_ids"]
        # Examples start on block boundaries and are contiguous; window padding is document 0.
        starts = [0] + [j for j in range(1, 48) if docs[j] != docs[j - 1]]
        assert all(j % 4 == 0 for j in starts)
        real = docs > 0
        assert not s["eligible"][~real].any()
        seen_examples += len(torch.unique(docs[real]))
        # Prompt tokens (everything up to each "assistant" generation prompt) are never eligible.
        for d in torch.unique(docs[real]).tolist():
            toks = s["tokens"][docs == d].tolist()
            elig = s["eligible"][docs == d].tolist()
            first = elig.index(True)
            assert tok.decode(toks[:first]).endswith("<|im_start|>assistant\n")
            assert all(elig[first:])  # response, end-of-turn and block padding
    assert seen_examples == 3

    with pytest.raises(SystemExit, match="chat.jsonl:3: invalid JSON"):
        preprocess_sft.main(
            ["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--output-prefix", str(tmp_path / "s2"),
             "--seq-length", "48", "--block-size", "4", "--strict"]
        )  # fmt: skip
    assert list(tmp_path.glob("s2*")) == []  # a failed run leaves no partial dataset
    with pytest.raises(SystemExit, match="multiple of --block-size"):
        preprocess_sft.main(
            ["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--output-prefix", str(tmp_path / "s3"),
             "--seq-length", "50", "--block-size", "4"]
        )  # fmt: skip
    truncated = preprocess_sft.main(
        ["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--output-prefix", str(tmp_path / "s4"),
         "--seq-length", "48", "--block-size", "4", "--truncate"]
    )  # fmt: skip
    assert truncated["examples"] == 4 and truncated["too_long"] == {"too long (truncated)": 1}
    with pytest.raises(ValueError, match="repack"):
        SFTWindowDataset(str(prefix), seq_length=16, pad_id=tok.eod_id)


def test_sft_window_noise_never_touches_prompt(tmp_path, chat_tokenizer_dir):
    src = tmp_path / "chat.jsonl"
    write_chat(src, [{"prompt": "what is two plus two", "response": "the answer is four"}] * 6)
    prefix = tmp_path / "sft"
    preprocess_sft.main(
        ["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--output-prefix", str(prefix),
         "--seq-length", "64", "--block-size", "4"]
    )  # fmt: skip
    tok = load_tokenizer(chat_tokenizer_dir)
    mask_id = tok.backend.convert_tokens_to_ids("<|mask|>")
    ds = SFTWindowDataset(str(prefix), seq_length=64, pad_id=tok.eod_id)
    sdar = SDARConfig(block_size=4, mask_token_id=mask_id, position_ids="document")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = ds[0]
        batch = build_sdar_batch(s["tokens"][None], s["doc_ids"][None], s["eligible"][None], sdar, gen)
        assert not batch.masked[~batch.eligible].any()
        noised = batch.input_ids[0, :64]
        assert torch.equal(noised[~s["eligible"]], s["tokens"][~s["eligible"]])
        # Positions restart at each example.
        pos = batch.position_ids[0, :64]
        starts = torch.nonzero(s["doc_ids"][1:] != s["doc_ids"][:-1]).flatten() + 1
        assert pos[0] == 0 and all(pos[j] == 0 for j in starts.tolist())


# a template in the style of those that insist on user/assistant alternation (after an optional system
# message) and refuse anything else with raise_exception
ALTERNATING = (
    "{% set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% endfor %}" + CHATML
)


@pytest.fixture(scope="module")
def alternating_tokenizer_dir(chat_tokenizer_dir, tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.chat_template = ALTERNATING
    out = tmp_path_factory.mktemp("alternating")
    tok.save_pretrained(out)
    return str(out)


def sft_args(src, tokenizer, prefix, *more) -> list[str]:
    return ["--input", str(src), "--tokenizer", tokenizer, "--output-prefix", str(prefix),
            "--seq-length", "48", "--block-size", "4", *more]  # fmt: skip


def turns(*roles: str) -> dict:
    return {
        "messages": [{"role": r, "content": "hello there" if r != "assistant" else "four"} for r in roles]
    }


# each unusable line, and the reason reported for it (file:line: reason)
UNUSABLE = [
    ("{bad json", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "x"}, "expected 'messages' or 'prompt' and 'response' keys"),
    ({"messages": [{"role": "user"}]}, "message 0 needs string 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "message 1 needs string 'role' and"),
    ({"prompt": 3, "response": "four"}, "'prompt' and 'response' must be strings"),
    (turns("assistant", "user", "assistant"), "the chat starts with the assistant's turn"),
    (turns("user", "user", "assistant"), "the chat template fails (TemplateError: Conversation roles must "),
    (
        {"prompt": "hello \ud800", "response": "four"},
        "unpaired surrogate in the text of 'prompt' (\\ud800 at ",
    ),
]


def test_unusable_chats_are_reported_with_file_and_line(tmp_path, alternating_tokenizer_dir, capsys):
    src = tmp_path / "chat.jsonl"
    good = {"prompt": "what is two plus two", "response": "the answer is four"}
    rows = [good] + [row for row, _ in UNUSABLE] + [turns("system", "user", "assistant")]
    with src.open("wb") as f:
        for row in rows:
            f.write(((row if isinstance(row, str) else json.dumps(row)) + "\n").encode())
        f.write(b'{"prompt": "caf\xe9", "response": "four"}\n')
    summary = preprocess_sft.main(sft_args(src, alternating_tokenizer_dir, tmp_path / "sft"))
    assert summary["examples"] == 2 and summary["dropped"] == len(UNUSABLE) + 1
    printed = capsys.readouterr().out
    for line, (_, reason) in enumerate(UNUSABLE, 2):
        assert f"{src}:{line}: {reason}" in printed, (line, reason, printed)
    assert f"{src}:{len(rows) + 1}: not UTF-8 (byte 0xe9 at column 16)" in printed
    # --strict: the first unusable line is the error, here a chat the template refuses
    write_chat(src, [good, turns("user", "user", "assistant"), "{bad json"])
    with pytest.raises(SystemExit) as raised:
        preprocess_sft.main(sft_args(src, alternating_tokenizer_dir, tmp_path / "strict", "--strict"))
    assert str(raised.value.code).startswith(f"error: {src}:2: {UNUSABLE[-2][1]}"), raised.value.code
    assert not list(tmp_path.glob("strict*"))


def test_no_usable_examples_is_an_error_that_counts_the_reasons(tmp_path, chat_tokenizer_dir):
    src = tmp_path / "chat.jsonl"
    long = {"prompt": "hello", "response": "the answer is four " * 10}
    write_chat(src, ["{bad", "{bad", turns("assistant", "user", "assistant"), long, long])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        preprocess_sft.main(sft_args(src, chat_tokenizer_dir, out / "sft"))
    error = str(raised.value.code)
    assert error.startswith("error: no usable examples; every line was dropped:\n")
    assert (
        "  2 lines: invalid JSON (Expecting property name enclosed in double quotes at column 2)\n" in error
    )
    assert "  1 line: the chat starts with the assistant's turn (there is no prompt before it)\n" in error
    assert f"  {src}:1: invalid JSON" in error
    assert "  2 examples: too long (dropped)\n" in error
    assert re.search(
        r"longest dropped example has \d+ tokens and --seq-length is 48: raise --seq-length", error
    )
    assert list(out.iterdir()) == []
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SystemExit, match="no usable examples: the input holds no non-blank lines"):
        preprocess_sft.main(sft_args(tmp_path / "empty.jsonl", chat_tokenizer_dir, out / "sft"))


def pack_in_memory(src, tokenizer_dir: str, seq_length: int, block_size: int):
    """Every example tokenised and held, then packed: what the tool writes, without its scratch file."""
    tok = load_tokenizer(tokenizer_dir)
    examples = []
    for line in src.read_text().splitlines():
        ex = pad_to_block(tokenize_chat(tok, example_messages(json.loads(line))), block_size, tok.eod_id)
        if len(ex) <= seq_length:
            examples.append(ex)
    windows = []
    for pack in pack_greedy([len(e) for e in examples], seq_length):
        tokens = [t for i in pack for t in examples[i].tokens]
        codes = [2 * k + e for k, i in enumerate(pack, 1) for e in examples[i].eligible]
        windows.append((tokens, codes))
    return windows


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "what is two plus two the answer is four hello there".split()
    return [
        {"prompt": " ".join(rng.choices(words, k=rng.randint(1, 8))),
         "response": " ".join(rng.choices(words, k=rng.randint(1, 30)))}
        for _ in range(n)
    ]  # fmt: skip


def test_windows_are_those_of_packing_everything_in_memory(tmp_path, chat_tokenizer_dir, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "chat.jsonl"
    write_chat(src, chats(60))
    prefix = tmp_path / "sft"
    leftover = tmp_path / "sft_tokens.tmp999999999.examples"  # no process has that id
    leftover.write_bytes(b"\0" * 10)
    summary = preprocess_sft.main(sft_args(src, chat_tokenizer_dir, prefix, "--seq-length", "64"))
    assert f"note: removed {leftover}: left by an interrupted run" in capsys.readouterr().err
    tokens, segments = IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_segments")
    expected = pack_in_memory(src, chat_tokenizer_dir, 64, 4)
    assert summary["windows"] == len(tokens) == len(expected) > 1
    for i, (window_tokens, codes) in enumerate(expected):
        assert tokens[i].tolist() == window_tokens and segments[i].tolist() == codes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat.jsonl", "sft_segments.bin", "sft_segments.idx", "sft_tokens.bin", "sft_tokens.idx"
    ]  # fmt: skip


def test_memory_does_not_grow_with_the_number_of_examples(tmp_path, chat_tokenizer_dir):
    """Holding the examples costs at least 5 bytes a token (numpy; ~45 as Python lists); streaming them
    through the scratch file costs a few bytes an example."""
    import tracemalloc

    def traced_peak(n: int) -> tuple[int, int]:
        src = tmp_path / f"chat{n}.jsonl"
        write_chat(
            src, [{"prompt": "hello", "response": "the answer is four " * 150 + str(i)} for i in range(n)]
        )
        argv = sft_args(src, chat_tokenizer_dir, tmp_path / f"sft{n}", "--seq-length", "1024", "--quiet")
        tracemalloc.start()
        try:
            summary = preprocess_sft.main(argv)
            return summary["tokens"], tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    warm = tmp_path / "warm.jsonl"
    write_chat(warm, chats(2))
    preprocess_sft.main(sft_args(warm, chat_tokenizer_dir, tmp_path / "warm", "--quiet"))  # imports, caches
    small_tokens, small_peak = traced_peak(10)
    large_tokens, large_peak = traced_peak(60)
    per_token = (large_peak - small_peak) / (large_tokens - small_tokens)
    assert large_tokens - small_tokens > 30_000
    assert per_token < 1.0, f"peak memory grows by {per_token:.1f} bytes per input token"
