"""Block-diffusion decoding (and plain AR decoding) over a KV-cache back end.

Blocks are aligned to each sequence's start, as in training (blocks counted from the document
start): a prompt whose length is not a multiple of ``B`` ends inside a block, and that block's
remaining positions are the first ones generated. Prompts of different lengths are left-padded by
whole blocks so every row shares block boundaries; padding is never attended to.

Per block: denoising forwards read the cache and do not write it; after each, the strategy
finalises some masked positions; a finished block's keys and values are written by one more forward
(the paper's extra pass) or, with ``fold_commit`` (default; exact, since the finished block only
attends to the cache and itself), by the next block's first denoising forward.

Where ``max_new_tokens`` ends inside a block, that last block is still decoded as a whole masked
block, as in training: its positions past the end are mask tokens like the rest (never the stop or
pad token, which the block being denoised would see) and are cut from the output afterwards. So
``n`` tokens decoded greedily are the first ``n`` of ``n + k``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_sdar.inference.sampling import SamplingConfig, choose_tokens
from megatron_sdar.inference.strategies import StrategyConfig, select, static_quota


@dataclass
class GenerationResult:
    """Generated tokens and the forward accounting.

    Only returned tokens count: positions of the last block past ``max_new_tokens`` (decoded so the
    block looks as in training) and tokens after a stop token are not ``generated``. A row takes part
    in a denoising forward (``row_forwards``) while one of its returned positions is still masked;
    the block's extra positions never cost a forward of their own, since denoising stops once every
    returned position is final.
    """

    tokens: list[list[int]]  # generated tokens per prompt (stop token included, nothing after it)
    denoise_forwards: int = 0  # forwards that produced tokens
    commit_forwards: int = 0  # extra forwards that only wrote a finished block's cache
    prefill_forwards: int = 0
    seconds: float = 0.0
    row_forwards: list[int] = field(default_factory=list)  # denoising forwards each row took part in
    blocks: int | None = None  # blocks decoded (block diffusion); None for AR decoding

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per denoising forward, per sequence (TPF)."""
        return self.generated / max(1, sum(self.row_forwards))

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """The accounting that applies: block figures only for block-diffusion decoding."""
        out = {
            "generated_tokens": self.generated,
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "denoise_forwards": self.denoise_forwards,
        }
        if self.blocks is not None:
            out["commit_forwards"] = self.commit_forwards
            out["forwards_per_block"] = round(self.denoise_forwards / max(1, self.blocks), 3)
        out["tokens_per_second"] = round(self.tokens_per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


def _clean_mask(block_ids: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[b, n, n]`` mask for clean tokens: block-causal (or causal), never to padding; every token
    sees itself so padded queries stay finite."""
    n = block_ids.shape[1]
    if causal:
        idx = torch.arange(n, device=block_ids.device)
        allowed = (idx[None, :] <= idx[:, None]).expand(block_ids.shape[0], n, n)
    else:
        allowed = block_ids[:, None, :] <= block_ids[:, :, None]
    eye = torch.eye(n, dtype=torch.bool, device=block_ids.device)
    return (allowed & valid[:, None, :]) | eye


def _check_prompts(prompts: list[list[int]], mask_token_id: int, vocab_size: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab_size or t == mask_token_id]
        if bad:
            raise ValueError(
                f"prompt {i} holds token ids outside the vocabulary or the mask token: {bad[:5]}"
            )


@torch.no_grad()
def generate_block_diffusion(
    backend,
    prompts: list[list[int]],
    *,
    block_size: int,
    mask_token_id: int,
    max_new_tokens: int,
    strategy: StrategyConfig | None = None,
    sampling: SamplingConfig | None = None,
    stop_token_ids: tuple[int, ...] = (),
    pad_token_id: int | None = None,
    seed: int = 0,
    fold_commit: bool = True,
    clean_attention: str = "block_causal",
) -> GenerationResult:
    """Decode ``max_new_tokens`` (or until a stop token) after each prompt, ``block_size`` at a time.

    A last block that ``max_new_tokens`` ends inside is decoded whole (all its free positions masked)
    and cut; see :class:`GenerationResult` for how its extra positions are counted (they are not).
    """
    strategy = strategy or StrategyConfig()
    sampling = sampling or SamplingConfig()
    if block_size < 1 or max_new_tokens < 1:
        raise ValueError("block_size and max_new_tokens must be >= 1")
    if clean_attention not in ("block_causal", "causal"):
        raise ValueError(f"clean_attention must be block_causal or causal, got {clean_attention!r}")
    _check_prompts(prompts, mask_token_id, backend.vocab_size)
    device, B, b = backend.device, block_size, len(prompts)
    pad = pad_token_id if pad_token_id is not None else (stop_token_ids[0] if stop_token_ids else 0)
    gen = torch.Generator(device=device).manual_seed(seed)
    steps = strategy.steps or B
    start = time.perf_counter()

    lengths = torch.tensor([len(p) for p in prompts], device=device)
    prompt_blocks = (lengths + B - 1) // B
    nb = int(prompt_blocks.max())
    pads = (nb - prompt_blocks) * B
    total_blocks = nb + math.ceil((max_new_tokens + B - 1) / B)
    frame = torch.full((b, total_blocks * B), pad, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        frame[r, int(pads[r]) : int(pads[r]) + len(p)] = torch.tensor(p, device=device)
    idx = torch.arange(frame.shape[1], device=device)
    positions = (idx[None, :] - pads[:, None]).clamp_min(0)
    prompt_end = pads + lengths
    returned_end = prompt_end + max_new_tokens  # first position not returned
    decode_end = (returned_end + B - 1) // B * B  # the end of the block holding the last returned one
    real = idx[None, :] >= pads[:, None]
    block_of = (idx // B)[None, :].expand(b, -1)
    causal = clean_attention == "causal"

    backend.reset(b)
    result = GenerationResult(tokens=[[] for _ in prompts], row_forwards=[0] * b, blocks=0)
    if nb > 1:  # prefill the blocks every prompt covers completely
        n = (nb - 1) * B
        backend.forward(
            frame[:, :n],
            positions[:, :n],
            _clean_mask(block_of[:, :n], real[:, :n], causal),
            real[:, :n],
            write=n,
        )
        result.prefill_forwards += 1

    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_token_ids, device=device) if stop_token_ids else None
    pending = None  # (tokens, positions, valid) of a finished block whose cache is not written yet
    for k in range(nb - 1, total_blocks):
        cols = slice(k * B, (k + 1) * B)
        block = frame[:, cols].clone()
        at = idx[cols][None, :]
        generate_here = (at >= prompt_end[:, None]) & (at < decode_end[:, None])
        returned = generate_here & (at < returned_end[:, None])
        masked = generate_here & ~finished[:, None]
        block[masked] = mask_token_id
        block[generate_here & finished[:, None]] = pad
        valid_block = real[:, cols]
        at_start = masked.sum(-1)
        step = 0
        if pending is not None and not bool((masked & returned).any()):  # nothing to decode: write it now
            commit = _clean_mask(torch.zeros_like(pending[1]), pending[2], causal)
            backend.forward(pending[0], pending[1], commit, pending[2], write=B)
            result.commit_forwards += 1
            pending = None
        while (masked & returned).any():  # the extra positions alone never take a forward
            if pending is not None:
                tokens = torch.cat([pending[0], block], dim=1)
                pos = torch.cat([pending[1], positions[:, cols]], dim=1)
                mask = torch.ones(b, 2 * B, 2 * B, dtype=torch.bool, device=device)
                mask[:, :B, :B] = _clean_mask(torch.zeros_like(pending[1]), pending[2], causal)
                mask[:, :B, B:] = False  # the finished block does not see the one being decoded
                mask[:, :, :B] &= pending[2][:, None, :] | torch.eye(
                    2 * B, B, dtype=torch.bool, device=device
                )
                key_valid = torch.cat([pending[2], valid_block], dim=1)
                logits = backend.forward(tokens, pos, mask, key_valid, write=B)[:, B:]
                pending = None
            else:
                mask = torch.ones(b, B, B, dtype=torch.bool, device=device)
                logits = backend.forward(block, positions[:, cols], mask, valid_block, write=0)
            result.denoise_forwards += 1
            for r in torch.nonzero((masked & returned).any(-1)).flatten().tolist():
                result.row_forwards[r] += 1
            logits = logits.float()
            logits[..., mask_token_id] = float("-inf")
            if logits.shape[-1] > backend.vocab_size:
                logits[..., backend.vocab_size :] = float("-inf")
            chosen, confidence, entropy = choose_tokens(logits, sampling, gen)
            quota = static_quota(at_start, steps, step)
            take = select(strategy, masked, confidence, entropy, quota)
            block[take] = chosen[take]
            masked &= ~take
            step += 1
        frame[:, cols] = block
        if stops is not None:
            hit = torch.isin(block, stops) & returned & ~finished[:, None]
            finished |= hit.any(-1)
        finished |= returned_end <= (k + 1) * B
        result.blocks += 1
        if bool(finished.all()):
            break
        if fold_commit:
            pending = (block, positions[:, cols], valid_block)
        else:
            mask = _clean_mask(torch.zeros_like(block), valid_block, causal)
            backend.forward(block, positions[:, cols], mask, valid_block, write=B)
            result.commit_forwards += 1
    for r in range(b):
        out = frame[r, int(prompt_end[r]) : int(prompt_end[r]) + max_new_tokens].tolist()
        for i, t in enumerate(out):
            if t in stop_token_ids:
                out = out[: i + 1]
                break
        result.tokens[r] = out
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def generate_ar(
    backend,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_token_ids: tuple[int, ...] = (),
    pad_token_id: int | None = None,
    seed: int = 0,
    mask_token_id: int | None = None,
) -> GenerationResult:
    """Plain next-token decoding with a causal mask (the AR baseline and ``ar`` checkpoints)."""
    sampling = sampling or SamplingConfig()
    _check_prompts(prompts, -1 if mask_token_id is None else mask_token_id, backend.vocab_size)
    device, b = backend.device, len(prompts)
    pad = pad_token_id if pad_token_id is not None else (stop_token_ids[0] if stop_token_ids else 0)
    gen = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    n = max(len(p) for p in prompts)
    tokens = torch.full((b, n), pad, dtype=torch.long, device=device)
    valid = torch.zeros(b, n, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        tokens[r, n - len(p) :] = torch.tensor(p, device=device)
        valid[r, n - len(p) :] = True
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    backend.reset(b)
    result = GenerationResult(tokens=[[] for _ in prompts], row_forwards=[0] * b, prefill_forwards=1)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
    mask = (causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=device)
    logits = backend.forward(tokens, positions, mask, valid, write=n)[:, -1]
    position = positions[:, -1]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    one = torch.ones(b, 1, 1, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = logits.float()
        if mask_token_id is not None:
            logits[..., mask_token_id] = float("-inf")
        chosen, _, _ = choose_tokens(logits, sampling, gen)
        for r in range(b):
            if not finished[r]:
                result.tokens[r].append(int(chosen[r]))
                result.row_forwards[r] += 1
                if int(chosen[r]) in stop_token_ids:
                    finished[r] = True
        if bool(finished.all()) or all(len(t) >= max_new_tokens for t in result.tokens):
            break
        position = position + 1
        step_valid = torch.ones(b, 1, dtype=torch.bool, device=device)
        logits = backend.forward(chosen[:, None], position[:, None], one, step_valid, write=1)[:, -1]
        result.denoise_forwards += 1
    result.denoise_forwards += 1  # the prefill produced the first token
    result.seconds = time.perf_counter() - start
    return result
