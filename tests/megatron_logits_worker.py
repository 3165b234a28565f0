"""The project's Megatron SDAR model's noised-half logits for a training-layout batch, from a
checkpoint, in a process of its own (Megatron's MoE router assumes CUDA, so this runs under the
test-only CPU mapping of ``tests/cpu_cuda.py``).

    python tests/megatron_logits_worker.py CKPT REQUEST.pt OUT.pt BLOCK_SIZE
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import cpu_cuda  # noqa: E402

cpu_cuda.install()

import torch  # noqa: E402


def main() -> None:
    from megatron_sdar.inference.loading import load_megatron_model
    from megatron_sdar.masks import make_layout
    from megatron_sdar.positions import sdar_position_ids

    ckpt, request_path, out_path, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    layout = torch.load(request_path)["layout"]
    doc_ids = layout["document_ids"]
    model, arch, _ = load_megatron_model(ckpt)
    with torch.no_grad():
        logits = model(
            layout["tokens"], sdar_position_ids(doc_ids, True), make_layout(doc_ids, block, "document")
        )
    torch.save({"logits": logits[..., : arch.vocab_size], "mask_token_id": arch.mask_token_id,
                "vocab": arch.vocab_size}, out_path)  # fmt: skip


if __name__ == "__main__":
    main()
