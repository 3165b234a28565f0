"""The SDAR export as the serving stack sees it: a self-contained transformers remote-code model.

Dense (Qwen3 with a tokenizer, Llama) and MoE (Qwen3-MoE) models go HF -> Megatron (mask token
added) -> ``convert_mcore_to_hf.py --format sdar``; a fresh interpreter where neither this project
nor Megatron can be imported loads the folder with ``trust_remote_code=True`` under the installed
transformers 5.x and under 4.52.4 (the line the released SDAR checkpoints were saved with; installed
into a cache folder on first use). One such interpreter per transformers line checks all three
exports; each test reads its family's result. Checked: no missing or unexpected weights; the
training layout's noised-half logits equal the project's Megatron model within 1e-4 (fp32);
``generate`` decodes the same tokens as ``tools/generate.py`` for every strategy, greedy and sampled
with a seed; the tokenizer names the mask token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sdar.masks import document_ids_from_lengths

ROOT = Path(__file__).resolve().parent.parent
OLD_TRANSFORMERS = ("transformers==4.52.4", "tokenizers>=0.21,<0.22", "huggingface-hub>=0.30,<1.0")
BLOCK = 4
JOBS = [  # (strategy keyword arguments for the remote generate, the same for the decoding library)
    dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5),
    dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=1.0),
    dict(remasking_strategy="low_confidence_static", denoising_steps=2),
    dict(remasking_strategy="sequential"),
    dict(remasking_strategy="entropy_bounded", entropy_bound=2.0),
    dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=0.3, do_sample=True,
         temperature=0.8, top_k=20, top_p=0.9, seed=7),
]  # fmt: skip


def _library_kwargs(job: dict) -> dict:
    from megatron_sdar.inference import SamplingConfig, StrategyConfig

    strategy = StrategyConfig(
        job["remasking_strategy"], steps=job.get("denoising_steps"), tau=job.get("confidence_threshold", 0.9),
        entropy_bound=job.get("entropy_bound", 0.5),
    )  # fmt: skip
    sampling = SamplingConfig()
    if job.get("do_sample"):
        sampling = SamplingConfig(job["temperature"], job["top_k"], job["top_p"])
    return dict(strategy=strategy, sampling=sampling, seed=job.get("seed", 0))


def _bpe_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator(words * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def _qwen3_with_tokenizer(folder: Path) -> None:
    import transformers

    fast = _bpe_tokenizer(["blocks decode in parallel", "the mask token stands for a token to come"])
    cfg = transformers.Qwen3Config(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=1e6, tie_word_embeddings=True, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


KINDS = ("qwen3", "llama", "qwen3_moe")
TEXTS = ["blocks decode", "the mask token stands for"]  # the text prompts of the generate-tool check


def _build_export(kind: str, work: Path) -> tuple[str, Path, Path, Path]:
    """(kind, HF source, Megatron checkpoint, SDAR export) for one model family."""
    from tests.test_convert_tool import _tokenizer_and_model
    from tests.test_moe_conversion import hf_moe
    from tools import convert_hf_to_mcore, convert_mcore_to_hf

    src = work / "hf"
    mask = ["--mask-token", "<|MASK|>"]
    if kind == "qwen3":
        _qwen3_with_tokenizer(src)
    elif kind == "llama":
        src, _, _ = _tokenizer_and_model(work)
    else:
        hf_moe(True).save_pretrained(src)
        mask = ["--mask-token", "95"]  # an unused row of the 96-row vocabulary; no tokenizer
    # a folder name of its own per family: transformers 4.52 names the remote-code module after it,
    # and the workers load every family in one interpreter
    ckpt, out = work / "ckpt", work / f"sdar_{kind}"
    convert_hf_to_mcore.main(
        ["--hf-dir", str(src), "--save", str(ckpt), "--dtype", "fp32", "--block-size", str(BLOCK), *mask]
    )
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(out)])
    return kind, src, ckpt, out


class Exports:
    """The exports, what the project computes for each, and what each transformers line's worker
    computes for all of them, each made once per module on first use: one worker interpreter per
    transformers line checks every family (an interpreter start costs seconds)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.built: dict[str, tuple[str, Path, Path, Path]] = {}
        self.refs: dict[str, tuple[dict, dict]] = {}
        self.remote: dict[str, dict | str] = {}

    def export(self, kind: str) -> tuple[str, Path, Path, Path]:
        if kind not in self.built:
            self.built[kind] = _build_export(kind, self.tmp.mktemp(kind))
        return self.built[kind]

    def references(self, kind: str) -> tuple[dict, dict]:
        """(request, what the project computes for it)."""
        if kind not in self.refs:
            _, _, ckpt, export_dir = self.export(kind)
            config = json.loads((export_dir / "config.json").read_text())
            req = _request(kind, export_dir, config["mask_token_id"], config["vocab_size"], PROMPTS)
            self.refs[kind] = (
                req,
                _project_references(ckpt, export_dir, req, PROMPTS, self.tmp.mktemp("megatron")),
            )
        return self.refs[kind]

    def text_prompts(self) -> list[list[int]]:
        """``TEXTS`` as the qwen3 export's tokenizer encodes them."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.export("qwen3")[3])
        return [tok(t).input_ids for t in TEXTS]

    def worker(self, line: str, pythonpath: Path | None) -> dict:
        """``{kind: result}`` of one worker interpreter under transformers ``line`` for every family."""
        if line not in self.remote:
            requests = []
            for kind in KINDS:
                req, _ = self.references(kind)
                entry = dict(req, name=kind, folder=str(self.export(kind)[3]))
                if kind == "qwen3":
                    entry["text_generate"] = [
                        {"prompts": self.text_prompts(), "kwargs": dict(
                            remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5,
                            max_new_tokens=9)}
                    ]  # fmt: skip
                requests.append(entry)
            try:
                self.remote[line] = _run_worker(requests, self.tmp.mktemp(f"worker-{line}"), pythonpath)
            except AssertionError as err:  # a failed worker fails every test reading it, run once
                self.remote[line] = str(err)
        got = self.remote[line]
        if isinstance(got, str):
            pytest.fail(f"the transformers {line} worker failed:\n{got}")
        return got


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory)


@pytest.fixture(scope="module", params=KINDS)
def export(request, exports):
    """(kind, HF source, Megatron checkpoint, SDAR export) for one model family."""
    return exports.export(request.param)


@pytest.fixture(scope="session")
def old_transformers() -> Path:
    """transformers 4.52.4 (with its tokenizers / huggingface-hub) in a cache folder, installed once."""
    cache = Path(os.environ.get("MEGATRON_SDAR_TEST_CACHE", Path.home() / ".cache" / "megatron-sdar-tests"))
    target = cache / "transformers-4.52.4"
    if not (target / "transformers" / "__init__.py").is_file():
        staging = cache / f"transformers-4.52.4.tmp{os.getpid()}"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
             *OLD_TRANSFORMERS],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(
                f"could not install {OLD_TRANSFORMERS} for the compatibility check:\n{proc.stderr[-2000:]}"
            )
        os.replace(staging, target)
    return target


def _request(kind: str, export_dir: Path, mask_id: int, vocab: int, prompts: list[list[int]]) -> dict:
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 7]  # two documents in one window; blocks restart at the second
    doc_ids = document_ids_from_lengths(lengths).unsqueeze(0).expand(2, -1).contiguous()
    clean = torch.randint(0, min(vocab, mask_id) - 1, (2, sum(lengths)), generator=gen)
    noised = clean.clone()
    picked = torch.rand(clean.shape, generator=gen) < 0.5
    noised[picked] = mask_id
    labels = torch.where(picked, clean, torch.full_like(clean, -100))
    return {
        "layout": {"tokens": torch.cat([noised, clean], -1), "document_ids": doc_ids, "labels": labels},
        "generate": [{"prompts": prompts, "kwargs": dict(job, max_new_tokens=10)} for job in JOBS],
    }


def _run_worker(requests: list[dict], work: Path, pythonpath: Path | None) -> dict:
    """``{name: result}`` from one worker interpreter that loads every export ``requests`` names."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"exports": requests}, work / "request.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # stdin closed: from a terminal, transformers 5's AutoTokenizer would wait 15 s for an answer to
    # whether to trust the folder's remote code (the config's auto_map) before going on without it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "remote_code_worker.py"), str(work / "request.pt"),
         str(work / "result.pt")],
        cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / "result.pt")


def _worker_result(exports: Exports, kind: str, line: str, request: pytest.FixtureRequest) -> dict:
    """What the ``line`` worker computed for ``kind`` (the test fails with the traceback if it raised)."""
    pythonpath = request.getfixturevalue("old_transformers") if line == "4.52" else None
    got = exports.worker(line, pythonpath)[kind]
    assert "error" not in got, got.get("error")
    return got


def _project_references(
    ckpt: Path, export_dir: Path, request: dict, prompts: list[list[int]], work: Path
) -> dict:
    """The Megatron model's noised-half logits, and the tokens tools/generate.py's decoding gives."""
    from megatron_sdar.inference import HFBackend, generate_block_diffusion, load_hf_model

    work.mkdir(parents=True, exist_ok=True)
    torch.save(request, work / "request.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}  # its own world
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "megatron_logits_worker.py"), str(ckpt),
         str(work / "request.pt"), str(work / "logits.pt"), str(BLOCK)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(work / "logits.pt")
    config = json.loads((export_dir / "config.json").read_text())
    stops = (config["eos_token_id"],) if config.get("eos_token_id") is not None else ()
    hf, _ = load_hf_model(str(export_dir))
    ref["tokens"] = []
    for job in JOBS:
        result = generate_block_diffusion(
            HFBackend(hf), prompts, block_size=BLOCK, mask_token_id=ref["mask_token_id"], max_new_tokens=10,
            stop_token_ids=stops, **_library_kwargs(job),
        )  # fmt: skip
        ref["tokens"].append(result.tokens)
    return ref


PROMPTS = [[3, 17, 5], [9, 24, 2, 31, 8, 8, 1, 30, 12]]  # ids every test vocabulary has


@pytest.fixture(scope="module")
def references(export, exports):
    """(request, what the project computes for it) once per model family."""
    return exports.references(export[0])


@pytest.mark.parametrize("transformers_line", ["installed", "4.52"])
def test_export_loads_and_matches_without_the_project(
    export, references, transformers_line, exports, request
):
    kind = export[0]
    req, ref = references
    got = _worker_result(exports, kind, transformers_line, request)

    if transformers_line == "4.52":
        assert got["transformers"] == "4.52.4"
    assert got["imported"] == []  # neither megatron_sdar nor megatron was importable, and none was needed
    moe = kind == "qwen3_moe"
    assert got["config_class"] == ("SDARMoeConfig" if moe else "SDARConfig")
    assert got["model_class"] == ("SDARMoeForCausalLM" if moe else "SDARForCausalLM")
    assert got["model_type"] == ("sdar_moe" if moe else "sdar")
    assert (got["block_size"], got["mask_token_id"]) == (BLOCK, ref["mask_token_id"])
    assert got["missing"] == [] and got["unexpected"] == [] and got["mismatched"] == []
    diff = (got["noised_logits"] - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, diff
    labels = req["layout"]["labels"]
    expected_loss = torch.nn.functional.cross_entropy(
        ref["logits"].reshape(-1, ref["vocab"]), labels.reshape(-1)
    )
    assert abs(got["loss"].item() - expected_loss.item()) <= 1e-4
    for job, mine, theirs in zip(JOBS, got["generate"], ref["tokens"]):
        assert mine["tokens"] == theirs, job
    assert any(g["tokens_per_forward"] > 1.0 for g in got["generate"])  # blocks really decode in parallel
    if kind != "qwen3_moe":
        assert got["tokenizer_mask_token"] == "<|MASK|>"
        assert got["tokenizer_mask_token_id"] == ref["mask_token_id"]


@pytest.mark.parametrize("transformers_line", ["installed", "4.52"])
def test_generate_tool_and_remote_generate_agree_on_text_prompts(
    export, exports, transformers_line, request, tmp_path
):
    """tools/generate.py on the export (tokenised prompts, its default stop token) and the remote
    model's generate (in the worker of each transformers line) give the same tokens."""
    kind, _, _, export_dir = export
    if kind != "qwen3":
        pytest.skip("needs the tokenizer the qwen3 export ships")
    from tools import generate as generate_tool

    out_json = tmp_path / "out.json"
    generate_tool.main(
        ["--hf-dir", str(export_dir), *sum((["--prompt", t] for t in TEXTS), []), "--strategy",
         "low_confidence_dynamic", "--tau", "0.5", "--max-new-tokens", "9", "--json-out", str(out_json)]
    )  # fmt: skip
    tool_tokens = json.loads(out_json.read_text())["tokens"]
    got = _worker_result(exports, kind, transformers_line, request)
    assert got["text_generate"][0]["tokens"] == tool_tokens


def test_export_config_carries_the_released_fields(export):
    kind, _, _, export_dir = export
    config = json.loads((export_dir / "config.json").read_text())
    moe = kind == "qwen3_moe"
    released = {
        "architectures", "auto_map", "model_type", "attention_bias", "attention_dropout", "block_size",
        "mask_token_id", "fuse_cross_entropy", "head_dim", "hidden_act", "hidden_size", "initializer_range",
        "intermediate_size", "max_position_embeddings", "max_window_layers", "num_attention_heads",
        "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_scaling", "rope_theta",
        "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
        "use_sliding_window", "vocab_size", "ep_size", "micro_forward", "skip_checkpoint", "use_deepep",
        "debug", "attn_implementation",
    }  # fmt: skip
    if moe:
        released |= {
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
        }  # fmt: skip
    assert released <= set(config), sorted(released - set(config))
    assert config["architectures"] == ["SDARMoeForCausalLM" if moe else "SDARForCausalLM"]
    assert config["model_type"] == ("sdar_moe" if moe else "sdar")
    prefix = "modeling_sdar_moe" if moe else "modeling_sdar"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"{prefix}.{config['architectures'][0]}"
    for module in {v.split(".")[0] for v in config["auto_map"].values()}:
        assert (export_dir / f"{module}.py").is_file()
    assert config["torch_dtype"] == "float32"  # what the checkpoint stores
    assert config["qk_norm"] is (kind != "llama")
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert generation["block_size"] == BLOCK and generation["mask_token_id"] == config["mask_token_id"]
    assert generation["remasking_strategy"] == "low_confidence_dynamic"
    if not moe:
        assert config["eos_token_id"] == generation["eos_token_id"]
        tokenizer_config = json.loads((export_dir / "tokenizer_config.json").read_text())
        assert tokenizer_config["mask_token"] == "<|MASK|>"


def test_remote_generate_rejects_what_it_cannot_honour(export, tmp_path):
    """Unknown generate arguments and bad settings fail with a message, in-process."""
    kind, _, _, export_dir = export
    if kind != "llama":
        pytest.skip("one family is enough")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(ids, num_beams=4)
    with pytest.raises(TypeError, match="repetition_penalty"):
        model.generate(ids, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="remasking_strategy"):
        model.generate(ids, remasking_strategy="greedy")
    with pytest.raises(ValueError, match="mask token"):
        model.generate(torch.tensor([[3, model.config.mask_token_id]]))
    with pytest.raises(ValueError, match="even length"):
        model(input_ids=torch.tensor([[3, 4, 5]]), training_layout=True)
    # the block-causal cache: a prefix stored, then a denoising forward that reads it and stores nothing
    cache_out = model(torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]]), use_cache=True)
    cache = cache_out.past_key_values if hasattr(cache_out, "past_key_values") else cache_out.cache
    before = cache.get_seq_length()
    model(torch.tensor([[11, 12, 13, 14]]), past_key_values=cache, store_kv=False)
    assert before == 8 and cache.get_seq_length() == 8


def test_remote_generate_decodes_a_cut_last_block_as_the_library_does(export):
    """max_new_tokens ending inside a block: the remote generate decodes that block whole and cuts
    it exactly as the decoding library does (same tokens, same forward accounting), so for greedy
    strategies a shorter output is the start of a longer one."""
    kind, _, _, export_dir = export
    if kind != "llama":
        pytest.skip("one family is enough")
    from transformers import AutoModelForCausalLM

    from megatron_sdar.inference import HFBackend, generate_block_diffusion, load_hf_model

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    backend = HFBackend(load_hf_model(str(export_dir))[0])
    mask_id, width = model.config.mask_token_id, max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    keep = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    for job in [j for j in JOBS if not j.get("do_sample")]:
        longest = None
        for n in (10, 7, 2):  # each n ends inside a block for at least one prompt
            out = model.generate(
                ids, attention_mask=keep, max_new_tokens=n, eos_token_id=[], return_dict_in_generate=True,
                **job,
            )  # fmt: skip
            mine = generate_block_diffusion(
                backend, PROMPTS, block_size=BLOCK, mask_token_id=mask_id, max_new_tokens=n,
                **_library_kwargs(job),
            )  # fmt: skip
            assert out.sequences[:, width:].tolist() == mine.tokens, (job, n)
            assert out.denoise_forwards == mine.denoise_forwards
            assert abs(out.tokens_per_forward - mine.tokens_per_forward) < 1e-9
            longest = longest or mine.tokens
            assert mine.tokens == [t[:n] for t in longest], (job, n)


def test_a_causal_clean_attention_export_decodes_and_scores_as_trained(export, tmp_path):
    """A model trained with token-causal clean attention (e.g. with the joint AR loss) records it;
    the remote model then builds its cache causally and its training layout matches the Megatron
    model with that setting; the library decodes the same tokens."""
    kind, _, ckpt, _ = export
    if kind != "qwen3":
        pytest.skip("one family is enough")
    from transformers import AutoModelForCausalLM

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.inference import HFBackend, generate_block_diffusion, load_hf_model
    from megatron_sdar.masks import make_layout
    from megatron_sdar.positions import sdar_position_ids
    from tests.helpers import megatron_twin
    from tools import convert_mcore_to_hf

    causal_dir = tmp_path / "causal"
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(causal_dir), "--clean-attention", "causal"])
    config = json.loads((causal_dir / "config.json").read_text())
    assert config["clean_attention"] == "causal"
    remote = AutoModelForCausalLM.from_pretrained(
        causal_dir, trust_remote_code=True, dtype=torch.float32
    ).eval()
    hf, fields = load_hf_model(str(causal_dir))
    assert fields["clean_attention"] == "causal"
    mask_id = config["mask_token_id"]
    req = _request(kind, causal_dir, mask_id, config["vocab_size"], PROMPTS)
    layout = req["layout"]
    twin = megatron_twin(hf, SDARConfig(block_size=BLOCK, mask_token_id=mask_id, clean_attention="causal"))
    doc_ids = layout["document_ids"]
    with torch.no_grad():
        expected = twin(
            layout["tokens"], sdar_position_ids(doc_ids, True), make_layout(doc_ids, BLOCK, "document")
        )
        got = remote(input_ids=layout["tokens"], training_layout=True, document_ids=doc_ids).logits
    assert (got - expected[..., : got.shape[-1]]).abs().max().item() <= 1e-4
    remote.config.clean_attention = "block_causal"  # the setting matters: block-causal keys differ
    with torch.no_grad():
        other = remote(input_ids=layout["tokens"], training_layout=True, document_ids=doc_ids).logits
    assert (other - got).abs().max().item() > 1e-3
    remote.config.clean_attention = "causal"
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    keep = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    stops = (config["eos_token_id"],)
    for job in JOBS[:3]:
        out = remote.generate(ids, attention_mask=keep, max_new_tokens=10, **job)
        mine = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            mine.append(row[:cut])
        library = generate_block_diffusion(
            HFBackend(hf), PROMPTS, block_size=BLOCK, mask_token_id=mask_id, max_new_tokens=10,
            stop_token_ids=stops, clean_attention="causal", **_library_kwargs(job),
        )  # fmt: skip
        assert mine == library.tokens, job
