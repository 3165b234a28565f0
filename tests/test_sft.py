"""SFT data: response-only eligibility, block padding, greedy packing, stored windows."""

from __future__ import annotations

import json
import random

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
