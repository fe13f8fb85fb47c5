"""MLA decode attention over a paged latent KV cache (DeepSeek-V3, weight-absorbed).

Per layer the cache holds, for every token, the normalised latent ``c_kv`` (``L`` =
kv_lora_rank, 512 in V3) followed by the roped shared key ``k_rope`` (``R``, 64 in V3) in ONE
tensor ``kv_cache [num_blocks, block_size, L + R]``, paged by ``block_table``. The query is
already absorbed (``q_latent = q_nope @ W_UK`` per head), so every head attends to the same
rows and the value is the latent itself (the caller applies ``W_UV`` afterwards). For sequence
``b`` and head ``h``::

    row_j    = kv_cache[block_table[b, j // block_size], j % block_size]   j < seq_lens[b]
    s_j      = softmax_scale * (q_latent[b, h] . row_j[:L] + q_rope[b, h] . row_j[L:])
    out[b,h] = sum_j softmax(s)_j * row_j[:L]                                 [B, H, L]

Scores, softmax and the sum run in float32; the output has the query's dtype.

Triton design (flash-decoding): one program takes a block of ``BLOCK_H`` heads of one
sequence and one of ``num_splits`` contiguous slices of its keys, so each KV tile is read once
per head block and both products are ``tl.dot`` with heads as the M dimension
(``[BLOCK_H, L] x [L, BLOCK_N]`` and ``[BLOCK_H, BLOCK_N] x [BLOCK_N, L]``) under an online
softmax. With one split the program writes the final output; otherwise it writes a normalised
partial output and its log-sum-exp, and ``_mla_decode_combine_kernel`` merges the splits.

``mla_decode`` dispatches to ``mla_decode_triton`` (CUDA) or ``mla_decode_reference`` (torch).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from epserve.kernels.backend import FLOAT_DTYPES, interpreting, use_triton

_LOG2E = 1.4426950408889634
_MIN_SPLIT_LEN = 256  # keys; shorter slices cost more in the combine than they win
_MAX_SPLITS = 64
_MIN_BIG_BLOCKS = 16  # 64-head blocks per launch below which 16-head blocks are faster


@triton.jit
def _mla_decode_kernel(
    q_latent_ptr, q_rope_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    scale_log2,  # softmax_scale * log2(e): the softmax runs in base 2
    H, block_size,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kv_block, stride_kv_tok, stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, num_splits,
    L: tl.constexpr, R: tl.constexpr, STORE_LSE: tl.constexpr, PAGE_TILES: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid ``(cdiv(H, BLOCK_H), num_splits, B)``: heads vary fastest, so the programs that
    share a KV slice run together and hit L2."""
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask = heads < H
    l_mask = offs_l < L
    r_mask = offs_r < R

    q_lat = tl.load(  # [BLOCK_H, BLOCK_L]
        q_latent_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
        mask=h_mask[:, None] & l_mask[None, :], other=0.0)
    q_rope = tl.load(  # [BLOCK_H, BLOCK_R]
        q_rope_ptr + b * stride_rb + heads[:, None] * stride_rh + offs_r[None, :],
        mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's 16-bit tl.dot is wrong: do the dots in float32 there
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        if PAGE_TILES:  # the tile lies inside one page: one block-table read
            page = tl.load(block_table_ptr + b * stride_bt + n0 // block_size).to(tl.int64)
            rows = page * stride_kv_block + (pos - n0 + n0 % block_size) * stride_kv_tok
        else:
            page = tl.load(block_table_ptr + b * stride_bt + pos // block_size, mask=n_mask,
                           other=0).to(tl.int64)
            rows = page * stride_kv_block + (pos % block_size) * stride_kv_tok
        c_kv = tl.load(  # [BLOCK_N, BLOCK_L]
            kv_ptr + rows[:, None] + offs_l[None, :],
            mask=n_mask[:, None] & l_mask[None, :], other=0.0)
        k_rope = tl.load(  # [BLOCK_N, BLOCK_R]
            kv_ptr + rows[:, None] + L + offs_r[None, :],
            mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_rope = k_rope.to(tl.float32)

        s = tl.dot(q_lat, tl.trans(c_kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.dot(q_rope, tl.trans(k_rope), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(c_kv.dtype), c_kv, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0  # false only for an empty split
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_l[None, :],
        o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & l_mask[None, :])
    if STORE_LSE:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _mla_decode_combine_kernel(
    partial_ptr, lse_ptr, out_ptr, L, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Grid ``(H, B)``: merge the ``num_splits`` normalised partials of one (sequence, head),
    weighting each by its share ``2**lse_s / sum_s 2**lse_s`` of the softmax mass."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < L

    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, axis=0)  # finite: split 0 always holds key 0
    denom = tl.sum(tl.exp2(lse - m), axis=0)

    part_row = partial_ptr + b * stride_pb + h * stride_ph
    acc = tl.zeros([BLOCK_L], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(lse_row + s) - m) / denom  # 0 for an empty split
        acc += w * tl.load(part_row + s * stride_ps + offs_l, mask=l_mask, other=0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l,
             acc.to(out_ptr.dtype.element_ty), mask=l_mask)


def _check_inputs(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, num_splits):
    """Raise ValueError naming the first bad argument."""
    tensors = dict(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache,
                   block_table=block_table, seq_lens=seq_lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q_latent.device:
            raise ValueError(f"{name} is on {t.device}, q_latent on {q_latent.device}")
    for name, ndim in (("q_latent", 3), ("q_rope", 3), ("kv_cache", 3),
                       ("block_table", 2), ("seq_lens", 1)):
        if tensors[name].dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensors[name].shape)}")
    if q_latent.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q_latent dtype must be one of {FLOAT_DTYPES}, got {q_latent.dtype}")
    for name in ("q_rope", "kv_cache"):
        if tensors[name].dtype != q_latent.dtype:
            raise ValueError(f"{name} dtype {tensors[name].dtype} != q_latent {q_latent.dtype}")
    for name in ("block_table", "seq_lens"):
        if tensors[name].dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {tensors[name].dtype}")
    batch, heads, latent = q_latent.shape
    if q_rope.shape[:2] != (batch, heads):
        raise ValueError(f"q_rope shape {tuple(q_rope.shape)} must start with {(batch, heads)}")
    if kv_cache.shape[2] != latent + q_rope.shape[2]:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != L + R = "
                         f"{latent} + {q_rope.shape[2]}")
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"block_table {tuple(block_table.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have batch {batch} first")
    if not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if not seq_lens.is_cuda:  # value checks would cost a device sync on the GPU
        _check_seq_lens(seq_lens, block_table.shape[1] * kv_cache.shape[1])


def _check_seq_lens(seq_lens, capacity):
    if seq_lens.numel() and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity):
        raise ValueError(f"seq_lens must lie in [1, max_blocks_per_seq * block_size = "
                         f"{capacity}], got {seq_lens.tolist()}")


def mla_decode_reference(q_latent, q_rope, kv_cache, block_table, seq_lens,
                         softmax_scale: float) -> torch.Tensor:
    """Pure-torch MLA decode. q_latent [B, H, L], q_rope [B, H, R],
    kv_cache [num_blocks, block_size, L + R], block_table [B, max_blocks] int32,
    seq_lens [B] int32 -> [B, H, L] in q_latent.dtype.

    Gathers every sequence's rows padded to the longest one, masks the padding, and never
    follows an unused block-table entry."""
    latent = q_latent.shape[2]
    block_size = kv_cache.shape[1]
    if q_latent.shape[0] == 0:
        return torch.empty_like(q_latent)
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=kv_cache.device)  # [T]
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, T]
    pages = block_table[:, pos // block_size].long()  # [B, T]
    pages = torch.where(valid, pages, torch.zeros_like(pages))
    rows = kv_cache[pages, pos % block_size].float()  # [B, T, L + R]
    c_kv, k_rope = rows[..., :latent], rows[..., latent:]
    scores = (torch.einsum("bhl,btl->bht", q_latent.float(), c_kv)
              + torch.einsum("bhr,btr->bht", q_rope.float(), k_rope)) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # [B, H, T]
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,btl->bhl", probs, c_kv).to(q_latent.dtype)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only the split heuristic sees this


class _Tiling(NamedTuple):
    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    per_sm: int  # programs resident on one SM at a time (registers and shared memory)


def _tiling(batch: int, heads: int, dtype: torch.dtype) -> _Tiling:
    """Tiling of the split kernel, tuned on an H100 for L=512, R=64: with 64+ heads, 64-head
    blocks (fewer KV re-reads, larger MMAs) once there are enough of them to fill the GPU;
    else 16-head blocks and more programs."""
    if dtype == torch.float32:
        return _Tiling(16, 16, 4, 1, per_sm=2)
    if heads >= 64 and batch * triton.cdiv(heads, 64) >= _MIN_BIG_BLOCKS:
        return _Tiling(64, 64, 8, 2, per_sm=1)
    return _Tiling(16, 64, 4, 2, per_sm=2)


def mla_decode_num_splits(batch: int, heads: int, max_seq_len: int, dtype: torch.dtype,
                          device: torch.device) -> int:
    """The split count ``mla_decode`` picks when given none: as many as fit in one wave of
    resident programs (a partial second wave costs more than it wins), none shorter than
    _MIN_SPLIT_LEN keys. Call it with a host-side max length to launch without a device sync
    (e.g. under CUDA-graph capture)."""
    tiling = _tiling(batch, heads, dtype)
    programs = batch * triton.cdiv(heads, tiling.block_h)
    wave = _num_sms(torch.device(device)) * tiling.per_sm
    return max(1, min(wave // programs, triton.cdiv(max_seq_len, _MIN_SPLIT_LEN), _MAX_SPLITS))


def _launch(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, num_splits,
            block_h, block_n, num_warps, num_stages) -> torch.Tensor:
    """Run the split kernel (and the combine when num_splits > 1); inputs already checked."""
    batch, heads, latent = q_latent.shape
    rope = q_rope.shape[2]
    q_latent = q_latent if q_latent.stride(2) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(2) == 1 else q_rope.contiguous()
    kv_cache = kv_cache if kv_cache.stride(2) == 1 else kv_cache.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(batch, heads, latent, dtype=q_latent.dtype, device=q_latent.device)
    if num_splits == 1:
        partial, lse = out, out  # lse is not written
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        partial = torch.empty(batch, heads, num_splits, latent, dtype=torch.float32,
                              device=q_latent.device)  # [B, H, S, L]
        lse = torch.empty(batch, heads, num_splits, dtype=torch.float32,
                          device=q_latent.device)  # [B, H, S]
        part_strides, lse_strides = partial.stride()[:3], lse.stride()[:2]
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    block_l = max(16, triton.next_power_of_2(latent))
    block_r = max(16, triton.next_power_of_2(rope))
    grid = (triton.cdiv(heads, block_h), num_splits, batch)
    _mla_decode_kernel[grid](
        q_latent, q_rope, kv_cache, block_table, seq_lens, partial, lse,
        softmax_scale * _LOG2E, heads, kv_cache.shape[1],
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        *part_strides, *lse_strides, num_splits,
        L=latent, R=rope, STORE_LSE=num_splits > 1,
        PAGE_TILES=kv_cache.shape[1] % block_n == 0,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_R=block_r,
        DOT_PRECISION=precision, UPCAST=interpreting(q_latent),
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _mla_decode_combine_kernel[(heads, batch)](
            partial, lse, out, latent, num_splits, *partial.stride()[:3], *lse.stride()[:2],
            out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_L=block_l, num_warps=4)
    return out


def mla_decode_triton(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale: float,
                      *, num_splits: int | None = None) -> torch.Tensor:
    """Triton host function: check inputs, pick the tiling and num_splits, launch.
    Shapes as in ``mla_decode_reference``; runs on CUDA or under ``TRITON_INTERPRET=1``."""
    _check_inputs(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, num_splits)
    batch, heads, _ = q_latent.shape
    if batch == 0:
        return torch.empty_like(q_latent)
    tiling = _tiling(batch, heads, q_latent.dtype)
    if num_splits is None:  # reading the longest length syncs; pass num_splits to avoid it
        num_splits = mla_decode_num_splits(batch, heads, int(seq_lens.max()), q_latent.dtype,
                                           q_latent.device)
    return _launch(q_latent, q_rope, kv_cache, block_table, seq_lens, float(softmax_scale),
                   num_splits, *tiling[:4])


def mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale: float,
               *, num_splits: int | None = None) -> torch.Tensor:
    """MLA decode attention -> [B, H, L]: Triton when ``use_triton(q_latent)``, else the torch
    reference (``num_splits`` only matters to Triton)."""
    if not use_triton(q_latent):
        _check_inputs(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale,
                      num_splits)
        return mla_decode_reference(q_latent, q_rope, kv_cache, block_table, seq_lens,
                                    softmax_scale)
    return mla_decode_triton(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale,
                             num_splits=num_splits)
