"""Sort a batch's expert choices by expert and pad each expert's group to a multiple of ``block_m``.

The fused MoE kernels walk the sorted rows ``block_m`` at a time; every block belongs to exactly
one expert, so a program multiplies ``block_m`` gathered rows by one expert's weight tile.

For ``topk_ids [T, K]`` the choices are the flat indices ``t * K + k``. Choice ``t * K + k`` with
id ``-1`` (the expert lives on another shard) is dropped. Padding rows hold the sentinel ``T * K``.
``moe_align`` never synchronises with the host: it sizes its outputs by an upper bound ``P_max``
(``max_padded_rows``) and marks the row blocks past the ``P`` used rows with expert ``-1``, which
the kernels skip.

Example, ``K = 1``, ``block_m = 4``, ids ``[2, 0, 2, -1]`` (``P = 8``, ``P_max = 16``)::

    sorted_ids      = [1, 4, 4, 4,  0, 2, 4, 4,  4, 4, 4, 4,  4, 4, 4, 4]   # expert 0: choice 1;
    expert_ids      = [0, 2, -1, -1]                                        # expert 2: choices 0, 2
    num_post_padded = [8]

``moe_align`` runs ``moe_align_triton``, a one-program Triton kernel, when ``use_triton`` and for up
to ``TRITON_MAX_CHOICES`` choices (decode: two launches in all, where the ~25 small torch ops of the
reference cost 0.3-0.6 ms of host time on the H100 machine and made a T=1 MoE layer 3x slower), else
the vectorised torch ``moe_align_reference``.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from epserve.kernels.backend import use_triton

# One program serialises the work: on an H100 it takes 40 / 54 / 98 / 183 us of wall time at
# 512 / 1024 / 2048 / 4096 choices (E=256) vs ~330 us of host time for the torch path, which,
# unlike the kernel, overlaps with earlier GPU work. Beyond 2048 choices (T=256, top-8) use torch.
TRITON_MAX_CHOICES = 2048


def max_padded_rows(num_choices: int, num_experts: int, block_m: int) -> int:
    """Upper bound on ``P``: each non-empty expert adds fewer than ``block_m`` padding rows."""
    bound = num_choices + min(num_experts, num_choices) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def _check_inputs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a 2-D tensor [T, K], got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m <= 0:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    num_choices, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: count choices per expert, pad, place each choice, label every row block.

    ``sorted_ids`` arrives filled with the sentinel; choices are placed in their original order
    within an expert (same result as a stable sort).
    """
    experts = tl.arange(0, E_PAD)                                         # [E_PAD]
    offs = tl.arange(0, CHUNK)                                            # [CHUNK]
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_choices, CHUNK):
        ids = tl.load(ids_ptr + c0 + offs, mask=c0 + offs < num_choices, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M                  # [E_PAD], 0 past E
    padded_end = tl.cumsum(padded, axis=0)
    next_slot = padded_end - padded                                       # [E_PAD]
    for c0 in range(0, num_choices, CHUNK):
        ids = tl.load(ids_ptr + c0 + offs, mask=c0 + offs < num_choices, other=-1)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)             # [CHUNK, E_PAD] one-hot
        earlier = tl.cumsum(hit, axis=0) - hit                            # same expert, earlier in chunk
        dest = tl.sum(hit * (next_slot[None, :] + earlier), axis=1)       # [CHUNK]
        tl.store(sorted_ids_ptr + dest, c0 + offs, mask=(ids >= 0) & (ids < num_experts))
        next_slot += tl.sum(hit, axis=0)
    tl.store(num_post_padded_ptr, tl.sum(padded, axis=0))
    for b0 in range(0, num_blocks, CHUNK):
        start = (b0 + offs) * BLOCK_M                                     # [CHUNK] first row of block
        expert = tl.sum((padded_end[None, :] <= start[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < num_experts, expert, -1)
        tl.store(expert_ids_ptr + b0 + offs, expert, mask=b0 + offs < num_blocks)


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton: same outputs as :func:`moe_align_reference`, one kernel (plus the sentinel fill)."""
    _check_inputs(topk_ids, num_experts, block_m)
    flat = topk_ids.reshape(-1)                                           # [N]
    n = flat.numel()
    p_max = max_padded_rows(n, num_experts, block_m)
    sorted_ids = torch.full((p_max,), n, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty((p_max // block_m,), dtype=torch.int32, device=flat.device)
    num_post_padded = torch.empty((1,), dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pad))                              # [CHUNK, E_PAD] <= 8K ints
    _moe_align_kernel[(1,)](
        flat, sorted_ids, expert_ids, num_post_padded,
        n, num_experts, expert_ids.numel(),
        BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk,
    )
    return sorted_ids, expert_ids, num_post_padded


def moe_align_reference(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch: same contract as :func:`moe_align`, vectorised (no host sync, no loop over tokens)."""
    _check_inputs(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1)                                             # [N]
    n = flat.numel()
    p_max = max_padded_rows(n, num_experts, block_m)
    bucket = torch.where(flat >= 0, flat, num_experts)                      # [N], -1 -> bucket E
    sorted_bucket, order = torch.sort(bucket, stable=True)                  # [N] choices by expert

    experts = torch.arange(num_experts, dtype=bucket.dtype, device=device)  # [E]
    start = torch.searchsorted(sorted_bucket, experts)                      # [E] group starts
    count = torch.searchsorted(sorted_bucket, experts, right=True) - start
    padded = (count + block_m - 1) // block_m * block_m                    # [E] rows incl. padding
    padded_end = torch.cumsum(padded, 0)
    shift = padded_end - padded - start                                     # padded - unpadded start
    shift = F.pad(shift, (0, 1), value=p_max)                               # [E + 1]: dropped -> past end
    dest = (torch.arange(n, device=device) + shift[sorted_bucket]).clamp_(max=p_max)

    sorted_ids = torch.full((p_max + 1,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))                     # slot p_max: scratch
    sorted_ids = sorted_ids[:p_max]

    block_start = torch.arange(0, p_max, block_m, device=device)           # [P_max // block_m]
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)    # first e with end > start
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    num_post_padded = padded_end[-1:].to(torch.int32)                       # [1]
    return sorted_ids, expert_ids, num_post_padded


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flat choices ``t * K + k`` by expert, each group padded to a multiple of ``block_m``.

    Returns ``sorted_ids [P_max]`` int32 (sentinel ``T * K`` in padding rows), ``expert_ids
    [P_max // block_m]`` int32 (the expert of each row block, ``-1`` for the blocks past ``P``) and
    ``num_post_padded [1]`` int32 (``P``), where ``P_max = max_padded_rows(T * K, num_experts,
    block_m) >= P``. Triton when ``use_triton(topk_ids)`` and there are at most
    ``TRITON_MAX_CHOICES`` choices, else the torch reference.
    """
    if use_triton(topk_ids) and topk_ids.numel() <= TRITON_MAX_CHOICES:
        return moe_align_triton(topk_ids, num_experts, block_m)
    return moe_align_reference(topk_ids, num_experts, block_m)
