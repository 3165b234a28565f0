"""Evaluation: math word-problem accuracy under block-diffusion decoding, and held-out text scores
(the diffusion loss bound of Eq. 7 for SDAR models, next-token NLL for AR ones and for SDAR models
trained with the joint AR loss, whose token-causal clean half is a causal LM).

Both run on a decoding back end (:class:`~megatron_sdar.inference.HFBackend` or
:class:`~megatron_sdar.inference.MegatronBackend`): the text scores use the back end's forward with
an empty cache and the training layout's dense mask, so they equal the training objective. Windows
may differ in length (a held-out text rarely fills its last window): pass a ``[n, L]`` tensor or a
list of ``[L_i]`` rows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.loss import sdar_loss
from megatron_sdar.masks import dense_sdar_mask, document_ids_from_eod

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a completion: after the last ``####`` if present, else in a
    ``\\boxed{...}``, else the last number in the text; commas, currency and trailing dots dropped."""
    for pattern in (r"####\s*([^\n]*)", r"\\boxed\{([^}]*)\}", r"[Aa]nswer(?: is)?\s*[:=]?\s*([^\n]*)"):
        found = re.findall(pattern, text)
        if found:
            numbers = _NUMBER.findall(found[-1].replace("$", ""))
            if numbers:
                return _normalise(numbers[0])
    numbers = _NUMBER.findall(text.replace("$", ""))
    return _normalise(numbers[-1]) if numbers else None


def _normalise(number: str) -> str:
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value == int(value) else repr(value)


def gold_answer(answer: str) -> str:
    """The reference answer from a GSM8K-style answer (``... #### 42``) or a bare number."""
    got = extract_answer(answer)
    if got is None:
        raise ValueError(f"no numeric answer in {answer!r}")
    return got


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # normalised number


def read_math_problems(path: str, limit: int | None = None) -> list[MathProblem]:
    """JSONL with ``question`` and ``answer`` (``#### N`` or a number); bad lines fail with their number."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(MathProblem(str(row["question"]), gold_answer(str(row["answer"]))))
            except (json.JSONDecodeError, KeyError, ValueError) as err:
                raise ValueError(
                    f"{path}:{n}: expected JSON with 'question' and a numeric 'answer' ({err})"
                ) from None
            if limit and len(problems) >= limit:
                break
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


Windows = torch.Tensor | list[torch.Tensor]


def _rows(windows: Windows):
    """Each window as a ``[1, L_i]`` tensor."""
    for row in windows:
        yield row.reshape(1, -1)


@torch.no_grad()
def diffusion_bound(
    backend,
    windows: Windows,
    eod_id: int,
    sdar: SDARConfig,
    seed: int = 0,
    samples: int = 1,
) -> dict[str, float]:
    """Eq. 7 on ``windows`` (documents split at ``eod_id``), averaged over ``samples`` noise draws
    per window from a fixed seed: a Monte-Carlo bound on the NLL per token.

    A window whose length is not a multiple of the block size is completed to whole blocks by a
    padding document of its own (end-of-document tokens, not eligible): no real token attends to it
    and it adds nothing to the loss or the token count.
    """
    total = count = masked_ce = masked = 0.0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        for row in _rows(windows):
            doc_ids = document_ids_from_eod(row, eod_id)
            eligible = torch.ones_like(row, dtype=torch.bool)
            short = -row.shape[1] % sdar.block_size
            if short:
                row = torch.cat([row, row.new_full((1, short), eod_id)], 1)
                doc_ids = torch.cat([doc_ids, doc_ids.new_full((1, short), int(doc_ids.max()) + 1)], 1)
                eligible = torch.cat([eligible, eligible.new_zeros(1, short)], 1)
            batch = build_sdar_batch(row, doc_ids, eligible, sdar, gen)
            batch = _to(batch, backend.device)
            n = row.shape[1]
            backend.reset(1)
            mask = dense_sdar_mask(batch.layout, sdar.clean_attention)[:, 0]
            logits = backend.forward(
                batch.input_ids, batch.position_ids, mask, torch.ones_like(batch.input_ids, dtype=torch.bool)
            )
            logits = logits[:, :n, : backend.vocab_size].float()
            ce = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
            correct = (logits.argmax(-1) == batch.labels).float()
            loss_sum, tokens, report = sdar_loss(torch.stack([ce, correct], -1), batch, sdar.loss_normalizer)
            total += float(loss_sum)
            count += float(tokens)
            masked_ce += float(report["masked ce"][0])
            masked += float(report["masked ce"][1])
    return {
        "diffusion_bound": total / max(count, 1.0),
        "masked_ce": masked_ce / max(masked, 1.0),
        "tokens": count / samples,
    }


@torch.no_grad()
def next_token_nll(backend, windows: Windows, eod_id: int) -> dict[str, float]:
    """Mean next-token NLL inside documents, with a causal mask: AR models, and the clean half of an
    SDAR model trained with ``--sdar-ar-loss-weight`` (``--sdar-clean-attention causal``: a clean
    token attends to the earlier tokens of its document, as here). Each token predicts the next one
    of its document; the end-of-document token is predicted, nothing after it; positions run on
    across the window (the CPT default), as the training AR loss sees them."""
    total = count = 0.0
    for row in _rows(windows):
        row = row.to(backend.device)
        n = row.shape[1]
        backend.reset(1)
        doc_ids = document_ids_from_eod(row, eod_id)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=row.device))
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        positions = torch.arange(n, device=row.device)[None]
        logits = backend.forward(
            row, positions, causal[None] & same_doc, torch.ones_like(row, dtype=torch.bool)
        )
        logits = logits[:, :-1, : backend.vocab_size].float()
        nll = F.cross_entropy(logits.transpose(1, 2), row[:, 1:], reduction="none")
        keep = (doc_ids[:, 1:] == doc_ids[:, :-1]).float()
        total += float((nll * keep).sum())
        count += float(keep.sum())
    return {
        "nll": total / max(count, 1.0),
        "perplexity": math.exp(min(50.0, total / max(count, 1.0))),
        "tokens": count,
    }


def _to(batch, device):
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})
