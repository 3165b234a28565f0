"""The training entry's CPU-testable parts: SDAR flags and their validation, the CPT and SFT
dataset providers' samples, noise seeding, epoch shuffling, the AR baseline's loss mask."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.training.arguments import sdar_config_from_args, validate_sdar_args
from megatron_sdar.training.datasets import EpochDataset, SDARSampleDataset
from megatron_sdar.training.step import ar_forward

BASE_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "64", "--micro-batch-size", "2", "--position-embedding-type", "rope",
    "--transformer-impl", "local", "--calculate-per-token-loss", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-rope-fusion", "--sdar-mask-token-id", "99",
]  # fmt: skip


def parse(extra: list[str], monkeypatch) -> types.SimpleNamespace:
    from megatron.training.arguments import parse_args

    import pretrain_sdar

    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *BASE_ARGS, *extra])
    return parse_args(pretrain_sdar._extra_args)


def test_defaults_are_valid(monkeypatch):
    args = parse([], monkeypatch)
    validate_sdar_args(args, vocab_size=128, special_tokens={"end-of-document": 1})
    assert args.sdar_objective == "sdar" and args.sdar_block_size == 4


@pytest.mark.parametrize(
    "extra, vocab, special, message",
    [
        (["--sdar-block-size", "5"], 128, None, "not a multiple of the SDAR block size 5"),
        (["--sdar-mask-token-id", "500"], 128, None, "outside the vocabulary"),
        ([], 128, {"end-of-document": 99}, "end-of-document token"),
        (["--context-parallel-size", "2", "--sdar-objective", "ar"], 128, None, "AR baseline"),
        (["--context-parallel-size", "3"], 128, None, "must be a multiple of 6"),
        (["--sequence-parallel", "--tensor-model-parallel-size", "3"], 128, None, "not a multiple of it"),
        (["--position-embedding-type", "learned_absolute"], 128, None, "--position-embedding-type rope"),
        (["--transformer-impl", "transformer_engine"], 128, None, "Transformer Engine is not installed"),
        (["--attention-dropout", "0.1"], 128, None, "--attention-dropout 0"),
        (["--sdar-noise-eps", "1.5"], 128, None, "--sdar-noise-eps"),
        (["--sdar-attention-backend", "split"], 128, None, "needs --bf16 or --fp16"),
        (["--rotary-interleaved"], 128, None, "non-interleaved RoPE"),
        (["--sdar-attention-backend", "split", "--bf16", "--kv-channels", "12"], 128, None, "multiple of 8"),
    ],
)
def test_invalid_settings_fail_with_advice(extra, vocab, special, message, monkeypatch):
    args = parse(extra, monkeypatch)
    with pytest.raises(ValueError, match=message):
        validate_sdar_args(args, vocab_size=vocab, special_tokens=special)


def test_split_backend_in_bf16_is_valid(monkeypatch):
    validate_sdar_args(parse(["--sdar-attention-backend", "split", "--bf16"], monkeypatch), vocab_size=128)


@pytest.mark.parametrize(
    "flag", ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-rope-fusion"]
)
def test_local_implementation_without_apex_needs_plain_kernels(flag, monkeypatch):
    from megatron.training.arguments import parse_args

    import pretrain_sdar

    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *[a for a in BASE_ARGS if a != flag]])
    args = parse_args(pretrain_sdar._extra_args)
    with pytest.raises(ValueError, match=flag):
        validate_sdar_args(args, vocab_size=128)


def test_distributed_optimizer_resume_without_apex_or_te_is_refused(tmp_path, monkeypatch):
    """megatron-core 0.19.2 cannot restore the distributed optimizer's state with torch's Adam; a
    run that would try says so before training instead of failing inside checkpoint loading."""
    args = parse(["--use-distributed-optimizer", "--load", str(tmp_path)], monkeypatch)
    validate_sdar_args(args, vocab_size=128)  # nothing to resume yet: a fresh run is fine
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ValueError, match="--no-load-optim"):
        validate_sdar_args(args, vocab_size=128)
    args.finetune = True
    validate_sdar_args(args, vocab_size=128)


def test_per_token_loss_and_mask_token_are_required(monkeypatch):
    from megatron.training.arguments import parse_args

    import pretrain_sdar

    argv = [a for a in BASE_ARGS if a not in ("--calculate-per-token-loss",)]
    argv = argv[: argv.index("--sdar-mask-token-id")]
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *argv])
    args = parse_args(pretrain_sdar._extra_args)
    with pytest.raises(ValueError) as err:
        validate_sdar_args(args, vocab_size=128)
    assert "--calculate-per-token-loss" in str(err.value) and "--sdar-mask-token-id is required" in str(
        err.value
    )


class _Tok:
    """The tokenizer attributes Megatron's GPT dataset reads."""

    def __init__(self, eod: int, vocab: int) -> None:
        self.eod = eod
        self.vocab_size = vocab
        self.unique_identifiers = {"class": "test", "eod": eod}


@pytest.fixture(scope="module")
def cpt_prefix(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = tmp_path_factory.mktemp("cpt") / "docs"
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(out) + ".bin", dtype=np.uint16)
    for _ in range(40):
        doc = list(rng.integers(2, 90, size=int(rng.integers(3, 30)))) + [1]  # 1 = end of document
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(str(out) + ".idx")
    return str(out)


def build_cpt(prefix: str, seq_length: int, num_samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_sdar.training.datasets import _sdar_gpt_dataset_classes

    config = GPTDatasetConfig(
        random_seed=1, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        tokenizer=_Tok(eod=1, vocab=100), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, add_extra_token_to_sequence=False, path_to_cache=None,
    )  # fmt: skip
    real, _ = _sdar_gpt_dataset_classes()
    train, _, _ = BlendedMegatronDatasetBuilder(real, [num_samples, 0, 0], lambda: True, config).build()
    return train


def test_cpt_samples(cpt_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    train = build_cpt(cpt_prefix, seq_length=32, num_samples=20)
    corpus = IndexedDataset(cpt_prefix)  # keep it alive: items are views into its memory map
    documents = {tuple(np.array(corpus[i]).tolist()) for i in range(len(corpus))}
    sdar = SDARConfig(block_size=4, mask_token_id=99)
    ds = SDARSampleDataset(train, sdar, seed=5, split="train")
    s0 = ds[0]
    assert s0["input_ids"].shape == (64,) and s0["layout"].shape == (2, 32)
    clean = s0["labels"]
    # Documents are packed whole (GPTDataset shuffles their order): every piece that starts after
    # an end-of-document token and ends with one is a corpus document.
    ends = [i for i in range(32) if clean[i] == 1]
    assert len(ends) >= 2
    for a, b in zip(ends, ends[1:]):
        assert tuple(clean[a + 1 : b + 1].tolist()) in documents
    # Documents split after every end-of-document token.
    docs = s0["layout"][0]
    for i in range(1, 32):
        assert (docs[i] != docs[i - 1]) == bool(clean[i - 1] == 1)
    # Masked positions carry the mask token in x_t, x_0 is untouched, and noise is reproducible.
    assert torch.equal(s0["input_ids"][32:], clean)
    assert torch.equal(s0["input_ids"][:32][s0["masked"]], torch.full((int(s0["masked"].sum()),), 99))
    again = ds[0]
    assert all(torch.equal(s0[k], again[k]) for k in s0)
    other_seed = SDARSampleDataset(train, sdar, seed=6, split="train")[0]
    valid_split = SDARSampleDataset(train, sdar, seed=5, split="valid")[0]
    assert not torch.equal(s0["masked"], other_seed["masked"]) or not torch.equal(s0["t"], other_seed["t"])
    assert not torch.equal(s0["t"], valid_split["t"])
    # Positions: the noised copy repeats the clean copy's (continuous by default).
    assert torch.equal(s0["position_ids"][:32], s0["position_ids"][32:])
    assert torch.equal(s0["position_ids"][:32], torch.arange(32))


def test_epoch_dataset_covers_each_epoch_in_a_new_order():
    base = list(range(10))
    ds = EpochDataset(base, num_samples=30, seed=3)
    epochs = [[ds[i] for i in range(e * 10, (e + 1) * 10)] for e in range(3)]
    assert all(sorted(e) == base for e in epochs)
    assert epochs[0] != epochs[1]
    assert [EpochDataset(base, 30, 3)[i] for i in range(30)] == sum(epochs, [])
    with pytest.raises(ValueError, match="empty"):
        EpochDataset([], 5, 0)


def test_ar_baseline_loss_mask_stays_inside_documents():
    seen = {}

    class Stub:
        def __call__(self, tokens, position_ids, attention_mask, labels):
            seen["labels"] = labels
            return torch.ones(labels.shape)

    sdar = SDARConfig(block_size=2, mask_token_id=9)
    from megatron_sdar.batch import build_sdar_batch

    tokens = torch.tensor([[5, 6, 1, 7, 8, 1]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    batch = build_sdar_batch(tokens, doc_ids, eligible, sdar, torch.Generator().manual_seed(0))
    _, loss_fn = ar_forward(Stub(), batch)
    assert seen["labels"].tolist() == [[6, 1, 7, 8, 1, 5]]
    loss_sum, count, _ = loss_fn(torch.ones(1, 6))
    # Predictions 5->6, 6->1, 7->8, 8->1 count; the EOD->next-document one and the last do not.
    assert int(count) == 4 and float(loss_sum) == 4.0


def test_sdar_batch_broadcast_shapes_single_rank(megatron_world):
    from megatron_sdar.training.step import SDARBatchReader

    sdar = SDARConfig(block_size=4, mask_token_id=99)
    base = [
        {
            "tokens": torch.arange(16) + 2,
            "doc_ids": torch.zeros(16, dtype=torch.long),
            "eligible": torch.ones(16, dtype=torch.bool),
        }
    ] * 2
    ds = SDARSampleDataset(base, sdar, seed=0, split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = SDARBatchReader().read(iter(loader), torch.device("cpu"), micro_batch_size=2, seq_length=16)
    # every field at its declared shape and dtype for b=2, L=16 (2L inputs, a [b, 2, L] layout), on
    # the device, plus the loader's host copy of the layout; nothing else
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in batch.items()} == {
        "input_ids": ((2, 32), torch.int64, "cpu"),
        "position_ids": ((2, 32), torch.int64, "cpu"),
        "layout": ((2, 2, 16), torch.int32, "cpu"),
        "labels": ((2, 16), torch.int64, "cpu"),
        "eligible": ((2, 16), torch.bool, "cpu"),
        "masked": ((2, 16), torch.bool, "cpu"),
        "mask_prob": ((2, 16), torch.float32, "cpu"),
        "t": ((2, 16), torch.float32, "cpu"),
        "layout_host": ((2, 2, 16), torch.int32, "cpu"),
    }
    assert torch.equal(batch["layout_host"], batch["layout"])

    batch = SDARBatchReader().read(iter(loader), torch.device("cpu"), 2, 16, loss_index=True)
    expected = batch["masked"].reshape(-1).nonzero().squeeze(1)
    assert batch["loss_index"].dtype == torch.int64 and torch.equal(batch["loss_index"], expected)


def test_output_positions_flag(monkeypatch):
    from megatron_sdar.training.arguments import output_on_masked

    assert output_on_masked(parse([], monkeypatch))  # the default: masked positions only
    assert output_on_masked(parse(["--tensor-model-parallel-size", "2"], monkeypatch))
    assert not output_on_masked(parse(["--sdar-output-positions", "noised"], monkeypatch))
    with pytest.raises(SystemExit):
        parse(["--sdar-output-positions", "all"], monkeypatch)


def test_repeated_layouts_reuse_the_device_tensors_and_their_masks(megatron_world):
    """Micro-batches with the same packing get the same layout and position tensors back, so the
    model's masks are built once; a different packing gets new ones."""
    from megatron_sdar.training.step import SDARBatchReader
    from tests.helpers import tiny_model

    sdar = SDARConfig(block_size=4, mask_token_id=99)

    def sample(doc_ids):
        return {"tokens": torch.arange(16) + 2, "doc_ids": torch.tensor(doc_ids),
                "eligible": torch.ones(16, dtype=torch.bool)}  # fmt: skip

    one_doc, two_docs = sample([0] * 16), sample([0] * 6 + [1] * 10)
    # noise differs per sample index, packing repeats: [one, one], [one, one], [two, one]
    dataset = SDARSampleDataset([one_doc] * 4 + [two_docs, one_doc], sdar, seed=0, split="train")
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=2))
    reader = SDARBatchReader()
    first, second, third = (reader.read(batches, torch.device("cpu"), 2, 16) for _ in range(3))
    assert not torch.equal(first["input_ids"], second["input_ids"])  # different noise
    assert second["layout"] is first["layout"] and second["position_ids"] is first["position_ids"]
    assert third["layout"] is not first["layout"] and not torch.equal(third["layout"], first["layout"])

    model = tiny_model(sdar, vocab_size=100, seq_length=16)
    before = model.mask_cache.builds
    for batch in (first, second):
        model(batch["input_ids"], batch["position_ids"], batch["layout"], labels=batch["labels"])
    assert model.mask_cache.builds - before == 1
    model(third["input_ids"], third["position_ids"], third["layout"], labels=third["labels"])
    assert model.mask_cache.builds - before == 2
    # another reader (another run) keeps nothing from this one
    again = iter(torch.utils.data.DataLoader(dataset, batch_size=2))
    fresh = SDARBatchReader().read(again, torch.device("cpu"), 2, 16)
    assert fresh["layout"] is not first["layout"] and torch.equal(fresh["layout"], first["layout"])


def test_agreement_check_runs_once_per_live_iterator():
    from megatron_sdar.training.step import IteratorsSeen

    _first_batch_of = IteratorsSeen().first_time

    class Batches:
        def __next__(self):
            return {}

    a = Batches()
    assert _first_batch_of(a) and not _first_batch_of(a)
    del a
    for _ in range(3):  # new objects, whatever addresses they get
        assert _first_batch_of(Batches())
    plain = iter([1, 2])  # no weak references: remembered by id and kept alive
    assert _first_batch_of(plain) and not _first_batch_of(plain)


def test_sdar_batch_with_wrong_sizes_fails_clearly(megatron_world):
    from megatron_sdar.training.step import SDARBatchReader

    sdar = SDARConfig(block_size=4, mask_token_id=99)
    sample = {"tokens": torch.arange(16) + 2, "doc_ids": torch.zeros(16, dtype=torch.long),
              "eligible": torch.ones(16, dtype=torch.bool)}  # fmt: skip
    loader = torch.utils.data.DataLoader(SDARSampleDataset([sample] * 2, sdar, 0, "train"), batch_size=2)
    with pytest.raises(ValueError, match="--micro-batch-size 4 and --seq-length 16"):
        SDARBatchReader().read(iter(loader), torch.device("cpu"), micro_batch_size=4, seq_length=16)
    with pytest.raises(RuntimeError, match="no data iterator"):
        SDARBatchReader().read(None, torch.device("cpu"), micro_batch_size=2, seq_length=16)


def test_resume_gives_the_same_samples_and_noise(cpt_prefix):
    """Stopping after N samples and resuming from consumed_samples=N replays exactly what an
    uninterrupted run would have read next, noise included, on every data-parallel rank."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    train = build_cpt(cpt_prefix, seq_length=32, num_samples=48)
    ds = SDARSampleDataset(train, SDARConfig(block_size=4, mask_token_id=99), seed=11, split="train")

    def read(consumed: int, rank: int, batches: int) -> list[dict]:
        sampler = MegatronPretrainingSampler(len(ds), consumed, 2, rank, 2)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
        out = []
        for i, batch in enumerate(loader):
            if i == batches:
                break
            out.append(batch)
        return out

    for rank in range(2):
        uninterrupted = read(0, rank, 6)
        resumed = read(3 * 2 * 2, rank, 3)  # 3 steps of micro-batch 2 on 2 DP ranks consumed
        for a, b in zip(uninterrupted[3:], resumed):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(read(0, 0, 1)[0]["input_ids"], read(0, 1, 1)[0]["input_ids"])


def test_dataset_provider_cpt_and_sft(cpt_prefix, tmp_path, monkeypatch, megatron_world):
    """The provider Megatron calls builds SDAR samples from --data-path for both stages."""
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args

    import pretrain_sdar
    from megatron_sdar.data.preprocessing import IndexedOutputs
    from megatron_sdar.data.sft_windows import encode_segments
    from megatron_sdar.training.datasets import train_valid_test_datasets_provider

    monkeypatch.setattr(global_vars, "_GLOBAL_TOKENIZER", _Tok(eod=1, vocab=100))
    seq = [*BASE_ARGS, "--seq-length", "32"]  # the later flag wins
    monkeypatch.setattr(
        sys, "argv", ["x", *seq, "--data-path", cpt_prefix, "--split", "90,10,0", "--seed", "3"]
    )
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", parse_args(pretrain_sdar._extra_args))
    train, valid, test = train_valid_test_datasets_provider([8, 4, 0])
    assert test is None and len(train) >= 8 and len(valid) >= 4
    sample = train[0]
    assert sample["input_ids"].shape == (64,) and int(sample["masked"].sum()) >= 1

    sft = str(tmp_path / "sft")
    with IndexedOutputs(
        {"tokens": sft + "_tokens", "segments": sft + "_segments"},
        {"tokens": np.uint16, "segments": np.int32},
    ) as out:
        for n in (12, 20, 32):
            out.add_document("tokens", list(range(2, 2 + n)))
            out.add_document(
                "segments", encode_segments([1] * (n // 2) + [2] * (n - n // 2), [False, True] * (n // 2))
            )
    sft_args = ["x", *seq, "--data-path", sft, "--sdar-stage", "sft"]
    monkeypatch.setattr(sys, "argv", sft_args)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", parse_args(pretrain_sdar._extra_args))
    train, valid, _ = train_valid_test_datasets_provider([7, 0, 0])
    assert len(train) == 7 and valid is None
    samples = [train[i] for i in range(6)]
    # Three windows per epoch, each once per epoch; padding is never eligible; positions restart per example.
    lengths = sorted(int((s["layout"][0] > 0).sum()) for s in samples[:3])
    assert lengths == [12, 20, 32]
    for s in samples:
        assert not s["masked"][s["layout"][0] == 0].any()
        assert not s["masked"][~s["eligible"]].any()
        assert s["position_ids"][0] == 0


def test_flex_kernel_options_flag(monkeypatch):
    from megatron_sdar.training.arguments import sdar_config_from_args

    args = parse(["--sdar-flex-kernel-options", '{"bwd_num_warps": 8}'], monkeypatch)
    assert sdar_config_from_args(args).flex_kernel_options == {"bwd_num_warps": 8}
    assert sdar_config_from_args(parse([], monkeypatch)).flex_kernel_options is None
    for bad in ("{bwd_num_warps: 8}", "[1, 2]"):
        with pytest.raises(SystemExit):
            parse(["--sdar-flex-kernel-options", bad], monkeypatch)


def test_every_settings_problem_is_listed_at_once(monkeypatch):
    """Problems of several kinds, including several that SDARConfig.validate finds one at a time."""
    from megatron_sdar.training.arguments import SettingsError

    extra = ["--sdar-block-size", "5", "--sdar-noise-eps", "1.5", "--sdar-mask-token-id", "500",
             "--sdar-noise-range", "0.8", "0.3"]  # fmt: skip
    args = parse([*extra, "--attention-dropout", "0.1"], monkeypatch)
    with pytest.raises(SettingsError) as err:
        validate_sdar_args(args, vocab_size=128)
    wanted = ["--attention-dropout 0", "not a multiple of the SDAR block size 5", "--sdar-noise-eps",
              "outside the vocabulary", "--sdar-noise-range"]  # fmt: skip
    assert len(err.value.problems) == len(wanted)
    assert all(any(w in p for p in err.value.problems) for w in wanted), err.value.problems
    message = str(err.value).splitlines()
    assert message[0] == "invalid settings (5 to fix):" and all(m.startswith("  - ") for m in message[1:])


def test_noise_range_and_empty_rows_reach_the_config(monkeypatch):
    args = parse(["--sdar-noise-range", "0.3", "0.8", "--sdar-empty-rows", "force"], monkeypatch)
    config = sdar_config_from_args(args)
    assert config.noise_range == (0.3, 0.8) and config.empty_rows == "force"
    default = sdar_config_from_args(parse([], monkeypatch))
    assert default.noise_range == (0.0, 1.0) and default.empty_rows == "redraw"


def _start(extra: list[str], monkeypatch):
    from megatron_sdar.training.arguments import fresh_start_notice, start_checkpoint_problems

    args = parse(extra, monkeypatch)
    return start_checkpoint_problems(args), fresh_start_notice(args)


def test_finetune_needs_the_checkpoint_it_names(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    problems, _ = _start(["--finetune", "--load", str(tmp_path / "empty")], monkeypatch)
    assert len(problems) == 1 and "holds no Megatron checkpoint" in problems[0]
    assert problems[0].startswith(f"--finetune --load {tmp_path / 'empty'}: ")
    problems, _ = _start(["--finetune", "--load", str(tmp_path / "typo")], monkeypatch)
    assert "does not exist" in problems[0] and "random weights" in problems[0]
    problems, _ = _start(["--finetune"], monkeypatch)
    assert problems and "pass --load DIR" in problems[0]
    # even where --load is also --save: --finetune names weights to start from
    flags = ["--finetune", "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "empty")]
    assert _start([*flags, "--save-interval", "1"], monkeypatch)[0]
    (tmp_path / "empty" / "latest_checkpointed_iteration.txt").write_text("release")
    assert _start(["--finetune", "--load", str(tmp_path / "empty")], monkeypatch) == ([], None)


def test_a_load_that_is_the_save_folder_may_start_fresh(tmp_path, monkeypatch):
    """The requeue pattern (--load equal to --save) starts fresh on its first run, saying so in one
    line; an empty --load anywhere else is a wrong path."""
    run = str(tmp_path / "run")
    problems, notice = _start(["--load", run, "--save", run + "/", "--save-interval", "5"], monkeypatch)
    assert problems == [] and notice.startswith(f"no checkpoint in --load {run} yet: starting from random")
    assert "\n" not in notice
    problems, notice = _start(["--load", str(tmp_path / "other"), "--save", run, "--save-interval", "5"],
                              monkeypatch)  # fmt: skip
    assert len(problems) == 1 and "not --save, so there is nothing to resume" in problems[0] and not notice
    assert _start(["--load", run, "--save", run, "--save-interval", "5", "--exit-on-missing-checkpoint"],
                  monkeypatch)[0]  # fmt: skip
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("10")
    assert _start(["--load", run, "--save", run, "--save-interval", "5"], monkeypatch) == ([], None)
    # --pretrained-checkpoint is used when --load holds none; it must hold one then
    problems, _ = _start(["--load", str(tmp_path / "new"), "--pretrained-checkpoint", str(tmp_path / "x")],
                         monkeypatch)  # fmt: skip
    assert problems and problems[0].startswith("--pretrained-checkpoint ")
    problems, notice = _start(["--load", str(tmp_path / "new"), "--pretrained-checkpoint", run], monkeypatch)
    assert problems == [] and notice is None


def test_wandb_without_tensorboard_is_refused(tmp_path, monkeypatch):
    """megatron-core 0.19.2 writes W&B only beside TensorBoard: W&B alone would log nothing."""
    from megatron_sdar.training.arguments import logging_problems

    wandb = ["--wandb-project", "p", "--wandb-exp-name", "e"]
    problems = logging_problems(parse(wandb, monkeypatch))
    assert len(problems) == 1 and "--tensorboard-dir" in problems[0]
    assert logging_problems(parse([*wandb, "--tensorboard-dir", str(tmp_path)], monkeypatch)) == []


def test_global_document_mask_is_for_cpt_only(monkeypatch):
    from megatron_sdar.training.arguments import SettingsError

    args = parse(["--sdar-document-mask", "global"], monkeypatch)
    assert sdar_config_from_args(args).document_mask == "global"
    validate_sdar_args(args, vocab_size=128)
    sft = parse(["--sdar-document-mask", "global", "--sdar-stage", "sft"], monkeypatch)
    with pytest.raises(SettingsError, match="global is the CPT mask"):
        validate_sdar_args(sft, vocab_size=128)
