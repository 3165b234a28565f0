"""Block-diffusion decoding on the HF back end: its masks and cache reproduce the training model's
noised-half logits, AR decoding matches transformers' own generate, and the decoding loop's
strategies, batching, stop tokens, commit folding and seeding behave as documented."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.inference import (
    HFBackend,
    MegatronBackend,
    SamplingConfig,
    StrategyConfig,
    generate_ar,
    generate_block_diffusion,
    select,
    static_quota,
)
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.positions import sdar_position_ids
from tests.helpers import megatron_twin, sdar_checkpoint, sdar_export
from tests.test_conversion import VOCAB, hf_model

MASK, B = VOCAB - 1, 4


@pytest.fixture(scope="module")
def qwen3():
    model, cfg = hf_model("qwen3", False)
    return model, cfg


@pytest.fixture(scope="module")
def megatron_qwen3(qwen3):
    """The same weights in the Megatron SDAR model (TP=1)."""
    return megatron_twin(qwen3[0], SDARConfig(block_size=B, mask_token_id=MASK))


def test_denoising_logits_equal_the_training_models(qwen3, megatron_qwen3):
    """Prefill two clean blocks, then one denoising forward over a partly masked third block: the
    logits equal the SDAR training model's noised-half logits for that block."""
    hf, cfg = qwen3
    model = megatron_qwen3
    clean = torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(3))
    noised = clean.clone()
    noised[0, [8, 10, 11]] = MASK
    doc_ids = document_ids_from_lengths([12]).unsqueeze(0)
    with torch.no_grad():
        expected = model(torch.cat([noised, clean], -1), sdar_position_ids(doc_ids, False),
                         make_layout(doc_ids, B, "document"))[0, 8:12]  # fmt: skip
    megatron = MegatronBackend(model, VOCAB)

    backend = HFBackend(hf)
    backend.reset(1)
    pos = torch.arange(12)[None]
    blocks = (torch.arange(8) // B)[None]
    prefix_mask = (blocks[:, None, :] <= blocks[:, :, None]).expand(1, 8, 8)
    backend.forward(clean[:, :8], pos[:, :8], prefix_mask, torch.ones(1, 8, dtype=torch.bool), write=8)
    got = backend.forward(noised[:, 8:], pos[:, 8:], torch.ones(1, 4, 4, dtype=torch.bool),
                          torch.ones(1, 4, dtype=torch.bool))[0]  # fmt: skip
    assert backend.cache_length == 8  # the denoising forward wrote nothing
    assert (got - expected).abs().max().item() <= 1e-4
    megatron.reset(1)
    megatron.forward(clean[:, :8], pos[:, :8], prefix_mask, torch.ones(1, 8, dtype=torch.bool), write=8)
    same = megatron.forward(noised[:, 8:], pos[:, 8:], torch.ones(1, 4, 4, dtype=torch.bool),
                            torch.ones(1, 4, dtype=torch.bool))[0]  # fmt: skip
    assert (same - expected).abs().max().item() <= 1e-4


def test_megatron_and_hf_back_ends_decode_the_same_tokens(qwen3, megatron_qwen3):
    hf, _ = qwen3
    prompts = [[5, 17, 3], [9, 44, 2, 71, 8, 8, 1]]
    for strategy in (StrategyConfig(tau=0.5), StrategyConfig("entropy_bounded", entropy_bound=2.0)):
        kw = dict(block_size=B, mask_token_id=MASK, max_new_tokens=10, strategy=strategy)
        a = generate_block_diffusion(HFBackend(hf), prompts, **kw)
        b = generate_block_diffusion(MegatronBackend(megatron_qwen3, VOCAB), prompts, **kw)
        assert a.tokens == b.tokens and a.denoise_forwards == b.denoise_forwards
    ar_a = generate_ar(HFBackend(hf), prompts, max_new_tokens=8)
    ar_b = generate_ar(MegatronBackend(megatron_qwen3, VOCAB), prompts, max_new_tokens=8)
    assert ar_a.tokens == ar_b.tokens


def test_ar_decoding_matches_transformers_generate(qwen3):
    hf, _ = qwen3
    prompt = [5, 17, 3, 9, 44, 2, 71]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    got = generate_ar(HFBackend(hf), [prompt], max_new_tokens=10)
    assert got.tokens[0] == expected[0, len(prompt) :].tolist()


def test_batches_of_different_lengths_decode_as_single_prompts(qwen3):
    hf, _ = qwen3
    backend = HFBackend(hf)
    prompts = [[5, 17, 3], [9, 44, 2, 71, 8, 8, 1], [60, 61, 62, 63, 64, 65, 66, 67]]
    for strategy in ("low_confidence_dynamic", "sequential"):
        kw = dict(
            block_size=B, mask_token_id=MASK, max_new_tokens=9, strategy=StrategyConfig(strategy, tau=0.3)
        )
        batched = generate_block_diffusion(backend, prompts, **kw)
        alone = [generate_block_diffusion(backend, [p], **kw).tokens[0] for p in prompts]
        assert batched.tokens == alone and all(len(t) == 9 for t in alone)
    ar_batched = generate_ar(backend, prompts, max_new_tokens=6)
    assert ar_batched.tokens == [generate_ar(backend, [p], max_new_tokens=6).tokens[0] for p in prompts]


def test_folding_the_commit_pass_is_exact(qwen3):
    hf, _ = qwen3
    backend = HFBackend(hf)
    prompts = [[5, 17, 3, 9, 44], [2, 71]]
    kw = dict(block_size=B, mask_token_id=MASK, max_new_tokens=12, strategy=StrategyConfig(tau=0.5))
    folded = generate_block_diffusion(backend, prompts, fold_commit=True, **kw)
    separate = generate_block_diffusion(backend, prompts, fold_commit=False, **kw)
    assert folded.tokens == separate.tokens
    assert folded.commit_forwards == 0 and separate.commit_forwards > 0
    assert folded.denoise_forwards == separate.denoise_forwards


def test_strategies_forward_counts(qwen3):
    hf, _ = qwen3
    backend = HFBackend(hf)
    prompt = [[5, 17, 3, 9]]  # a whole block: generation starts on a block boundary
    kw = dict(block_size=B, mask_token_id=MASK, max_new_tokens=8)
    static = generate_block_diffusion(backend, prompt, strategy=StrategyConfig("low_confidence_static"), **kw)
    assert static.denoise_forwards == 8 and static.tokens_per_forward == 1.0
    two = generate_block_diffusion(
        backend, prompt, strategy=StrategyConfig("low_confidence_static", steps=2), **kw
    )
    assert two.denoise_forwards == 4 and two.tokens_per_forward == 2.0
    tau_one = generate_block_diffusion(backend, prompt, strategy=StrategyConfig(tau=1.0), **kw)
    assert tau_one.tokens == static.tokens and tau_one.denoise_forwards == 8
    eager = generate_block_diffusion(backend, prompt, strategy=StrategyConfig(tau=0.0), **kw)
    assert eager.denoise_forwards == 2 and eager.tokens_per_forward == 4.0
    sequential = generate_block_diffusion(backend, prompt, strategy=StrategyConfig("sequential"), **kw)
    assert sequential.denoise_forwards == 8
    bounded = generate_block_diffusion(
        backend, prompt, strategy=StrategyConfig("entropy_bounded", entropy_bound=1e9), **kw
    )
    assert bounded.denoise_forwards == 2


def test_sampling_is_seeded(qwen3):
    hf, _ = qwen3
    backend = HFBackend(hf)
    kw = dict(block_size=B, mask_token_id=MASK, max_new_tokens=12, sampling=SamplingConfig(temperature=1.0))
    a = generate_block_diffusion(backend, [[5, 17, 3]], seed=1, **kw)
    assert a.tokens == generate_block_diffusion(backend, [[5, 17, 3]], seed=1, **kw).tokens
    assert a.tokens != generate_block_diffusion(backend, [[5, 17, 3]], seed=2, **kw).tokens
    assert all(t != MASK for t in a.tokens[0])


class ScriptedBackend:
    """Logits that put almost all mass on ``script[position]`` (for loop-level tests)."""

    def __init__(self, script: list[int], vocab: int = 16) -> None:
        self.script, self.vocab_size, self.device = script, vocab, torch.device("cpu")
        self.calls, self.inputs = [], []

    def reset(self, batch: int) -> None:
        self.calls.clear()
        self.inputs.clear()

    def forward(self, tokens, positions, self_mask, key_valid, write=0):
        self.calls.append((tokens.shape[1], write))
        self.inputs.append(tokens.clone())
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        target = torch.tensor(self.script)[positions.clamp_max(len(self.script) - 1)]
        return logits.scatter(-1, target.unsqueeze(-1), 20.0)


def test_stop_token_inside_a_block_ends_the_row():
    script = [3, 3, 3, 4, 5, 6, 1, 7, 8, 9, 10, 11, 12]  # token 1 (stop) at position 6
    backend = ScriptedBackend(script)
    out = generate_block_diffusion(
        backend, [[3, 3, 3]], block_size=4, mask_token_id=15, max_new_tokens=10, stop_token_ids=(1,)
    )
    assert out.tokens == [[4, 5, 6, 1]]  # truncated after the stop token
    assert all(n <= 8 for n, _ in backend.calls)  # never more than two blocks per forward


def test_the_last_block_is_decoded_whole_and_cut():
    """max_new_tokens ending inside a block: the block is denoised with all its free positions
    masked (as in training), never with the stop token the frame is padded with, and cut after;
    only the returned tokens count, and decoding stops once they are final."""
    script = [3, 3, 3, 3, 4, 5, 6, 7, 8, 9]
    backend = ScriptedBackend(script)
    kw = dict(block_size=4, mask_token_id=15, max_new_tokens=2, stop_token_ids=(1,))
    sequential = generate_block_diffusion(backend, [[3] * 4], strategy=StrategyConfig("sequential"), **kw)
    assert sequential.tokens == [[4, 5]]
    assert backend.inputs[0][0, -4:].tolist() == [15, 15, 15, 15]  # not [15, 15, 1, 1]
    assert backend.inputs[1][0, -4:].tolist() == [4, 15, 15, 15]
    assert sequential.denoise_forwards == 2 and sequential.tokens_per_forward == 1.0  # then it stops
    eager = generate_block_diffusion(backend, [[3] * 4], strategy=StrategyConfig(tau=0.0), **kw)
    assert eager.tokens == [[4, 5]] and eager.denoise_forwards == 1
    assert eager.generated == 2 and eager.tokens_per_forward == 2.0  # the four decoded, two returned


def test_shorter_outputs_are_prefixes_of_longer_ones(qwen3):
    """Greedy decoding for every strategy: the n-token output is the first n tokens of the
    (n + k)-token one, also where n ends inside a block."""
    hf, _ = qwen3
    backend = HFBackend(hf)
    prompts = [[5, 17, 3], [9, 44, 2, 71, 8, 8, 1]]
    strategies = (
        StrategyConfig(tau=0.5), StrategyConfig("low_confidence_static", steps=2),
        StrategyConfig("sequential"), StrategyConfig("entropy_bounded", entropy_bound=2.0),
    )  # fmt: skip
    for strategy in strategies:
        kw = dict(block_size=B, mask_token_id=MASK, strategy=strategy, stop_token_ids=(VOCAB - 2,))
        longest = generate_block_diffusion(backend, prompts, max_new_tokens=10, **kw)
        for n in (2, 7):  # both prompts end 3 tokens into a block: each n ends inside one
            got = generate_block_diffusion(backend, prompts, max_new_tokens=n, **kw)
            assert got.tokens == [t[:n] for t in longest.tokens], (strategy, n)
            assert got.denoise_forwards <= longest.denoise_forwards


def test_select_and_quota_by_hand():
    masked = torch.tensor([[True, True, False, True]])
    conf = torch.tensor([[0.2, 0.95, 0.99, 0.5]])
    ent = torch.tensor([[0.3, 0.1, 0.0, 0.2]])
    one = torch.tensor([1])
    assert select(StrategyConfig("low_confidence_dynamic", tau=0.9), masked, conf, ent, one).tolist() == [
        [False, True, False, False]
    ]
    assert select(StrategyConfig("low_confidence_dynamic", tau=0.99), masked, conf, ent, one).tolist() == [
        [False, True, False, False]
    ]  # nothing above tau: the most confident one
    assert select(StrategyConfig("low_confidence_static"), masked, conf, ent, torch.tensor([2])).tolist() == [
        [False, True, False, True]
    ]
    assert select(StrategyConfig("sequential"), masked, conf, ent, torch.tensor([2])).tolist() == [
        [True, True, False, False]
    ]
    assert select(StrategyConfig("entropy_bounded", entropy_bound=0.35), masked, conf, ent, one).tolist() == [
        [False, True, False, True]
    ]
    assert (
        static_quota(torch.tensor([5]), 2, 0).item() == 3
        and static_quota(torch.tensor([5]), 2, 1).item() == 2
    )
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        StrategyConfig("greedy")


def test_generate_tool_on_an_sdar_export(tmp_path):
    """HF model -> Megatron (mask token added) -> HF SDAR export -> tools/generate.py, both modes."""
    import json

    from tools import generate as generate_tool

    src, export, mask_id = sdar_export(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the mask token"}) + "\n" + "blocks decode\n")
    out = generate_tool.main(
        ["--hf-dir", str(export), "--prompts-file", str(prompts), "--max-new-tokens", "8", "--tau", "0.5",
         "--json-out", str(tmp_path / "out.json")]
    )  # fmt: skip
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]
    assert summary["block_size"] == 4 and summary["tokens_per_forward"] > 0.0
    assert (summary["strategy"], summary["tau"]) == ("low_confidence_dynamic", 0.5) and "steps" not in summary
    assert len(out["completions"]) == 2 and all(mask_id not in t for t in out["tokens"])  # never the mask
    sequential = generate_tool.main(
        ["--hf-dir", str(export), "--prompt", "blocks", "--strategy", "sequential", "--max-new-tokens", "5"]
    )["summary"]
    assert sequential["steps"] == 4 and not {"tau", "min_per_step", "entropy_bound"} & set(sequential)
    ar = generate_tool.main(
        ["--hf-dir", str(export), "--prompt", "blocks", "--mode", "ar", "--max-new-tokens", "5"]
    )
    assert ar["summary"]["tokens_per_forward"] == 1.0
    assert not {"forwards_per_block", "commit_forwards", "tau", "strategy", "block_size"} & set(ar["summary"])
    with pytest.raises(SystemExit, match="records no SDAR block size"):
        generate_tool.main(["--hf-dir", str(src), "--prompt", "blocks"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        generate_tool.main(["--hf-dir", str(export), "--prompts-file", str(bad)])


def test_generate_from_megatron_at_tp2(tmp_path):
    """Two gloo ranks decode the checkpoint tensor-parallel and produce the TP=1 tokens."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import free_port
    from tools import generate as generate_tool

    _, ckpt, _ = sdar_checkpoint(tmp_path)
    flags = ["--load", str(ckpt), "--prompt", "the mask token", "--prompt", "blocks", "--max-new-tokens", "8"]
    single = generate_tool.main([*flags, "--tau", "0.5"])
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), str(root / "tools" / "generate.py"), *flags, "--tau", "0.5",
         "--json-out", str(tmp_path / "tp2.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "tp2.json").read_text())["tokens"] == single["tokens"]


def test_generate_refuses_a_tokenizer_folder_without_tokenizer_files(tmp_path):
    """transformers builds a one-token placeholder from a model's config.json alone; the tool says
    the folder holds no tokenizer instead of decoding empty prompts."""
    from tools import generate as generate_tool

    _, export, _ = sdar_export(tmp_path)
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text((export / "config.json").read_text())
    with pytest.raises(SystemExit, match="holds no tokenizer files"):
        generate_tool.main(["--hf-dir", str(export), "--tokenizer", str(weights_only), "--prompt", "hi"])
