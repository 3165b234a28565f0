"""Run one SDAR training step through Megatron's forward-backward schedule at a given TP/PP.

``ref`` phase (one process, TP=PP=1): build a tiny model, run the step, save weights, loss, grads.
``par`` phase (several processes): load the reference weights sharded for this rank's TP/PP
position, run the same micro-batches, gather gradients back to full shape and compare.
Exit status 0 means equal within tolerance; the comparison is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from functools import partial

import torch

warnings.filterwarnings("ignore")

NUM_LAYERS = 4
VOCAB = 128
SEQ = 32
MBS = 2
NUM_MICROBATCHES = 4
# The load-balancing loss is on: it dominates the router's gradient at this size, so the comparison
# covers its scaling when data-parallel ranks run fewer micro-batches than the single process.
MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    moe_token_dispatcher_type="allgather",
    moe_aux_loss_coeff=0.01,
    moe_grouped_gemm=False,
)


RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def make_batches(sdar):
    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.masks import document_ids_from_eod

    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(2, VOCAB - 1, (MBS, SEQ), generator=gen)
        eod = torch.rand((MBS, SEQ), generator=gen) < 0.08
        tokens[eod] = 1
        doc_ids = document_ids_from_eod(tokens, 1)
        eligible = torch.rand((MBS, SEQ), generator=gen) < 0.9
        batches.append(build_sdar_batch(tokens, doc_ids, eligible, sdar, gen))
    return batches


def tp_split_dim(name: str) -> int | None:
    """Which dimension a parameter is split on across tensor-parallel ranks (None: replicated)."""
    if name.endswith(
        ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_fc1.weight")
    ):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or size == 1:
        return full.clone()
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0).clone()
    return full.chunk(size, dim=dim)[rank].clone()


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    return torch.cat(parts, dim=dim)


def global_name(name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """A pipeline stage's (and expert-parallel rank's) local parameter name -> the unsplit model's."""
    prefix = "decoder.layers."
    if name.startswith(prefix):
        idx, rest = name[len(prefix) :].split(".", 1)
        experts = "mlp.experts.local_experts."
        if rest.startswith(experts):
            e, tail = rest[len(experts) :].split(".", 1)
            rest = f"{experts}{int(e) + expert_offset}.{tail}"
        return f"{prefix}{int(idx) + layer_offset}.{rest}"
    return name


def run_load(args) -> int:
    """Load a converted checkpoint at this TP/PP layout and compare every parameter, gathered back
    to full size, with the reference (the same checkpoint loaded at TP=PP=1)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_sdar.config import SDARConfig
    from tests.helpers import init_megatron, tiny_model
    from tests.test_conversion import FFN, HEAD_DIM, HEADS, HIDDEN, KV, LAYERS

    if args.tied and args.pp > 1:  # Megatron syncs tied embeddings across stages on the CUDA device
        from tests import cpu_cuda

        cpu_cuda.install()

    init_megatron(tp=args.tp, pp=args.pp, rank=args.rank, world_size=args.world_size, port=args.port)
    model = tiny_model(
        SDARConfig(block_size=4, mask_token_id=1), vocab_size=128, seq_length=32, tied=args.tied,
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=KV,
        kv_channels=HEAD_DIM, ffn_hidden_size=FFN, qk_layernorm=(args.arch == "qwen3"), seed=9,
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    loaded = dist_checkpointing.load(model.sharded_state_dict(), args.ckpt, strict="assume_ok_unexpected")
    model.load_state_dict(loaded, strict=False)
    ref = torch.load(args.ref, weights_only=True)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // args.pp)
    failures = []
    for name, param in model.named_parameters():
        parts = [torch.empty_like(param) for _ in range(args.tp)]
        torch.distributed.all_gather(parts, param.detach().contiguous(), group=tp_group)
        full_name = global_name(name, offset)
        if full_name not in ref and full_name == "output_layer.weight" and args.tied:
            full_name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
        if not torch.equal(unshard(name, parts), ref[full_name]):
            failures.append(full_name)
    print(json.dumps({"rank": args.rank, "failures": failures}))
    return 1 if failures else 0


def run(args) -> int:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sdar.batch import BATCH_FIELDS, SDARBatch
    from megatron_sdar.config import SDARConfig
    from megatron_sdar.context_parallel import clean_positions, slice_micro_batch
    from megatron_sdar.loss import next_token_targets, sdar_loss
    from megatron_sdar.model.sdar import masked_loss_index
    from tests.cpu_shims import install_cpu_schedule_shims
    from tests.helpers import init_megatron, tiny_model

    if args.sp or args.moe or args.recompute:  # Megatron's SP collectives, MoE router, recompute assume CUDA
        from tests import cpu_cuda

        cpu_cuda.install()
    init_megatron(
        tp=args.tp,
        pp=args.pp,
        rank=args.rank,
        world_size=args.world_size,
        port=args.port,
        ep=args.ep if args.phase == "par" else 1,
        vpp=args.vpp if args.phase == "par" else 1,
        etp=args.etp if args.phase == "par" else None,
        cp=args.cp if args.phase == "par" else 1,
    )
    install_cpu_schedule_shims()
    if args.sp or args.moe or args.recompute:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()

    sdar = SDARConfig(
        block_size=4,
        mask_token_id=VOCAB - 1,
        clean_attention=args.clean_attention,
        loss_normalizer=args.loss_normalizer,
        position_ids=args.position_ids,
    )
    cp = args.cp if args.phase == "par" else 1
    chunks = args.vpp if args.phase == "par" else 1
    models, offsets = [], []
    for vp_stage in range(chunks):
        models.append(
            tiny_model(
                sdar,
                vocab_size=VOCAB,
                seq_length=SEQ,
                tied=args.tied,
                num_layers=NUM_LAYERS,
                pipeline_dtype=torch.float32,
                calculate_per_token_loss=True,
                sequence_parallel=args.sp and args.phase == "par",
                **(MOE if args.moe else {}),
                expert_model_parallel_size=args.ep if args.phase == "par" else 1,
                context_parallel_size=cp,
                **(RECOMPUTE if args.recompute else {}),
                **({"expert_tensor_parallel_size": args.etp} if args.etp and args.phase == "par" else {}),
                # gloo matches concurrent batched sends between two ranks by tag only, and the
                # interleaved schedule has forward and backward messages in flight both ways
                **(
                    {"virtual_pipeline_model_parallel_size": chunks, "batch_p2p_comm": False}
                    if chunks > 1
                    else {}
                ),
                vp_stage=vp_stage if chunks > 1 else None,
            )
        )
        # global index of this chunk's first layer (interleaved: chunk v of rank r is stage v*pp + r)
        offsets.append((vp_stage * args.pp + pp_rank) * (NUM_LAYERS // (args.pp * chunks)))
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    expert_offset = ep_rank * (MOE["num_moe_experts"] // args.ep) if args.moe else 0
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def split_of(name: str) -> tuple[int, int, object]:
        """(size, rank, group) of the tensor-parallel split this parameter follows: experts are split
        over the expert-tensor-parallel group (Megatron's ETP), everything else over TP."""
        if ".mlp.experts." in name:
            return (
                parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_group(),
            )
        return args.tp, tp_rank, tp_group

    if args.phase == "par":
        ref = torch.load(args.ref, weights_only=True)
        with torch.no_grad():
            for model, layer_offset in zip(models, offsets):
                for name, param in model.named_parameters():
                    full = ref["weights"][global_name(name, layer_offset, expert_offset)]
                    size, rank, _ = split_of(name)
                    param.copy_(shard(name, full, rank, size))

    # Data parallelism: each DP rank takes its share of the reference micro-batches.
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    # gradients and token counts are summed over data- and context-parallel ranks (Megatron's DDP
    # and finalize_model_grads); expert weights over the ranks holding the same experts
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_cp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    expert_dp_size = torch.distributed.get_world_size(expert_dp_group)
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_group = parallel_state.get_context_parallel_group() if cp > 1 else None
    batches = make_batches(sdar)[dp_rank::dp_size]

    micro = iter(range(10**6))  # micro-batch counter: each one's embedding noise has its own seed

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        index = next(micro)
        targets, valid = next_token_targets(batch.labels, batch.layout, batch.eligible)
        if cp > 1:  # this rank's chunks of the whole micro-batch (as the training's batch reader)
            whole = {f.name: getattr(batch, f.name) for f in BATCH_FIELDS}
            batch = SDARBatch.from_mapping(slice_micro_batch(whole, cp, cp_rank))
            positions = clean_positions(SEQ, cp, cp_rank)
            targets, valid = targets[:, positions], valid[:, positions]
        # the reference always runs the output layer on the whole noised half
        selected = args.masked_output and args.phase == "par"
        ar = {}  # the joint AR loss: next-token targets of the clean half (on them only when selected)
        if args.ar_loss_weight:
            ar = {"ar_labels": targets, "ar_index": masked_loss_index(valid) if selected else None}
        if args.embedding_noise:  # the same seed for a micro-batch on every rank (as in training)
            ar["mask_embedding_noise"] = (args.embedding_noise, 1000 * dp_rank + index)
        output = model(
            batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
            loss_index=masked_loss_index(batch.masked) if selected else None, **ar,
        )  # fmt: skip
        return output, partial(
            sdar_loss, batch=batch, normalizer=sdar.loss_normalizer, ar_weight=args.ar_loss_weight,
            ar_valid=valid, count_group=cp_group,
        )  # fmt: skip

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in models] if len(models) > 1 else iter(batches),
        model=models,
        num_microbatches=len(batches),
        seq_length=2 * SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    # What Megatron's finalize_model_grads does with --calculate-per-token-loss: the token count
    # reported by the loss function is taken from the last stage, summed over data-parallel ranks,
    # and gradients (summed over DP) are divided by it. QK-norm weights are replicated across TP
    # ranks but each rank sees only its own heads, so their gradients are summed over TP.
    last = parallel_state.is_pipeline_last_stage()
    stats = torch.zeros(2, dtype=torch.float64)
    if last:
        stats[0] = float(sum(d["lm loss"][0] for d in losses))
        stats[1] = float(sum(d["lm loss"][1] for d in losses))
    torch.distributed.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(stats, group=dp_cp_group)
    loss_sum, total_tokens = stats.tolist()
    grads = {}
    for model, layer_offset in zip(models, offsets):
        for name, param in model.named_parameters():
            # (and with sequence parallelism every norm weight sees only its rank's positions)
            if args.tp > 1 and (
                "q_layernorm" in name or "k_layernorm" in name or getattr(param, "sequence_parallel", False)
            ):
                torch.distributed.all_reduce(param.grad, group=tp_group)
            if getattr(param, "allreduce", True):
                if dp_cp_size > 1:
                    torch.distributed.all_reduce(param.grad, group=dp_cp_group)
            elif expert_dp_size > 1:  # expert weights: over the ranks holding the same experts
                torch.distributed.all_reduce(param.grad, group=expert_dp_group)
            grads[(name, layer_offset)] = param.grad.detach() / total_tokens
    loss = loss_sum / total_tokens if last else None

    if args.phase == "ref":
        weights = {n: p.detach().clone() for n, p in models[0].named_parameters()}
        grads = {name: g for (name, _), g in grads.items()}
        torch.save({"weights": weights, "grads": grads, "loss": loss}, args.ref)
        print(json.dumps({"loss": loss}))
        return 0

    ref = torch.load(args.ref, weights_only=True)
    worst = 0.0
    failures = []
    for (name, layer_offset), grad in grads.items():
        size, _, group = split_of(name)
        parts = [torch.empty_like(grad) for _ in range(size)]
        torch.distributed.all_gather(parts, grad.contiguous(), group=group)
        full = unshard(name, parts)
        expected = ref["grads"][global_name(name, layer_offset, expert_offset)]
        diff = (full - expected).abs().max().item()
        scale = expected.abs().max().item() + 1e-12
        worst = max(worst, diff / scale)
        if not torch.allclose(full, expected, rtol=1e-4, atol=1e-6):
            failures.append(
                f"{global_name(name, layer_offset, expert_offset)}: max abs diff {diff:.3e} "
                f"(scale {scale:.3e})"
            )
    result = {"rank": args.rank, "tp_rank": tp_rank, "pp_rank": pp_rank, "worst_rel_grad_diff": worst}
    if loss is not None:
        result["loss"] = loss
        result["ref_loss"] = ref["loss"]
        if abs(loss - ref["loss"]) > 1e-5 * max(1.0, abs(ref["loss"])):
            failures.append(f"loss {loss} != reference {ref['loss']}")
    result["failures"] = failures
    print(json.dumps(result))
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["ref", "par", "load"], required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--ref", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (par phase)")
    parser.add_argument("--moe", action="store_true", help="4 experts, top-2, in every layer")
    parser.add_argument("--ep", type=int, default=1, help="expert parallelism (par phase)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallelism (default: TP)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank (par phase)")
    parser.add_argument("--cp", type=int, default=1, help="context parallelism (par phase)")
    parser.add_argument("--recompute", action="store_true", help="full activation recompute, every layer")
    parser.add_argument("--position-ids", default="continuous", help="continuous (CPT) or document (SFT)")
    parser.add_argument("--clean-attention", default="block_causal")
    parser.add_argument("--loss-normalizer", default="eligible")
    parser.add_argument("--ar-loss-weight", type=float, default=0.0, help="joint AR loss (causal clean half)")
    parser.add_argument(
        "--embedding-noise", type=float, default=0.0, help="std of the mask-embedding noise (0 = off)"
    )
    parser.add_argument(
        "--masked-output", action="store_true", help="output layer on masked positions only (par phase)"
    )
    args = parser.parse_args()
    sys.exit(run_load(args) if args.phase == "load" else run(args))


if __name__ == "__main__":
    main()
