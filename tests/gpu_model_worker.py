"""GPU checks of the whole SDAR model (run by tests/test_gpu_model.py in its own process, NCCL).

* FlexAttention and dense-mask SDPA back ends give the same loss and gradients (bf16 tolerance);
* the split back end agrees with SDPA, and the output layer on masked positions only with the
  whole noised half;
* no synchronising CUDA call from reading a micro-batch (pinned loader) to the end of its
  backward, with either fast back end;
* full and selective activation recompute give the same loss and gradients as none (the layout
  tensor goes through ``tensor_parallel.checkpoint`` and the mask is rebuilt or reused inside).
Prints one JSON line with the measured differences.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.config import SDARConfig
    from megatron_sdar.loss import sdar_loss
    from megatron_sdar.masks import document_ids_from_eod
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model, masked_loss_index

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)

    vocab, seq = 256, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(2, vocab - 1, (2, seq), device="cuda", generator=gen)
    tokens[torch.rand((2, seq), device="cuda", generator=gen) < 0.02] = 1
    doc_ids = document_ids_from_eod(tokens, 1)
    eligible = torch.ones_like(tokens, dtype=torch.bool)

    def run(backend: str, recompute: dict, masked_output: bool = False) -> tuple[float, dict]:
        sdar = SDARConfig(block_size=4, mask_token_id=vocab - 1, attention_backend=backend)
        config = qwen3_transformer_config(
            num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, kv_channels=32,
            ffn_hidden_size=512, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
            **recompute,
        )  # fmt: skip
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_sdar_model(config, sdar, vocab_size=vocab, max_sequence_length=2 * seq).cuda()
        batch = build_sdar_batch(
            tokens, doc_ids, eligible, sdar, torch.Generator(device="cuda").manual_seed(1)
        )
        builds = model.mask_cache.builds
        loss_index = masked_loss_index(batch.masked) if masked_output else None
        out = model(
            batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, loss_index=loss_index
        )
        loss_sum, count, _ = sdar_loss(out, batch)
        (loss_sum / count).backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        return float(loss_sum / count), grads, model.mask_cache.builds - builds

    def compare(a, b) -> dict:
        loss_diff = abs(a[0] - b[0])
        rel = max(((a[1][n] - b[1][n]).norm() / (b[1][n].norm() + 1e-12)).item() for n in a[1])
        return {"loss_diff": loss_diff, "max_rel_grad_diff": rel, "mask_builds": a[2]}

    base = run("flex", {})
    result = {
        "flex_vs_sdpa": compare(base, run("sdpa", {})),
        "split_vs_sdpa": compare(run("split", {}), run("sdpa", {})),
        "masked_output": compare(run("flex", {}, masked_output=True), base),
        "full_recompute": compare(run("flex", dict(recompute_granularity="full", recompute_method="uniform",
                                                   recompute_num_layers=1)), base),
        "selective_recompute": compare(run("flex", dict(recompute_granularity="selective",
                                                        recompute_modules=["core_attn"])), base),
    }  # fmt: skip
    result["pinned_loss_index"] = pinned_loss_index()
    result["host_syncs"] = {backend: host_syncs(backend, vocab, seq) for backend in ("flex", "split")}
    print(json.dumps(result))


def host_syncs(backend: str, vocab: int, seq: int) -> list[str]:
    """Synchronising CUDA calls while the training loop's path reads a micro-batch from a pinned
    data loader and runs forward+backward on it, after a warm-up micro-batch; the second packing
    differs, so its mask (or split plan) is built inside the checked region."""
    from megatron_sdar.batch import SDARBatch
    from megatron_sdar.config import SDARConfig
    from megatron_sdar.loss import sdar_loss
    from megatron_sdar.masks import document_ids_from_lengths
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model
    from megatron_sdar.training.datasets import SDARSampleDataset
    from megatron_sdar.training.step import SDARBatchReader

    sdar = SDARConfig(block_size=4, mask_token_id=vocab - 1, attention_backend=backend)
    config = qwen3_transformer_config(
        num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4, kv_channels=32,
        ffn_hidden_size=512, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )  # fmt: skip
    model = build_sdar_model(config, sdar, vocab_size=vocab, max_sequence_length=2 * seq).cuda()
    gen = torch.Generator().manual_seed(0)
    samples = [
        {"tokens": torch.randint(2, vocab - 1, (seq,), generator=gen),
         "doc_ids": document_ids_from_lengths(lengths), "eligible": torch.ones(seq, dtype=torch.bool)}
        for lengths in ([seq], [seq // 2, seq // 2], [seq // 3, seq - seq // 3], [seq])
    ]  # fmt: skip
    loader = torch.utils.data.DataLoader(
        SDARSampleDataset(samples, sdar, 0, "train"), batch_size=2, pin_memory=True
    )
    batches = iter(loader)
    reader = SDARBatchReader()

    def step() -> None:
        data = reader.read(batches, torch.device("cuda"), 2, seq, loss_index=True)
        batch = SDARBatch.from_mapping(data)
        out = model(
            batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
            loss_index=data["loss_index"], layout_host=data.get("layout_host"),
        )  # fmt: skip
        loss_sum, count, _ = sdar_loss(out, batch)
        (loss_sum / count).backward()

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message)]


def pinned_loss_index() -> bool:
    """The training loop's masked-position index from a pinned data loader equals the mask's."""
    from megatron_sdar.config import SDARConfig
    from megatron_sdar.training.datasets import SDARSampleDataset
    from megatron_sdar.training.step import SDARBatchReader

    sample = {
        "tokens": torch.arange(64) + 2,
        "doc_ids": torch.zeros(64, dtype=torch.long),
        "eligible": torch.ones(64, dtype=torch.bool),
    }
    dataset = SDARSampleDataset([sample] * 4, SDARConfig(block_size=4, mask_token_id=99), 0, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, pin_memory=True)
    batch = SDARBatchReader().read(iter(loader), torch.device("cuda"), 4, 64, loss_index=True)
    expected = batch["masked"].reshape(-1).nonzero().squeeze(1)
    return batch["loss_index"].is_cuda and torch.equal(batch["loss_index"], expected)


if __name__ == "__main__":
    main()
