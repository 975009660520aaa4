"""Sort-based expert dispatch: one sort per block, grouped matrix multiplies, one scatter per group.

The eager path of `ExpertGroup.dispatch` loops over experts in Python and gathers each expert's
tokens separately. Here instead:

1. `sort_assignments`: every (token, slot) routing assignment of a block, over all its routers,
   is ordered by global expert with a single stable argsort; per-expert counts and cumulative
   ends come from a scatter-add (no bincount: on CUDA it reads its size to the host).
2. `group_rows`: one expert group's contiguous run of that order (its experts are numbered
   consecutively), with group-local expert ids and cumulative ends.
3. An `ExpertLayout` holds the group's rows and applies per-expert weights (E, out, in), in the
   layout of transformers' experts, to all of them at once:
   - `grouped_mm`: rows stay sorted; one `torch.nn.functional.grouped_mm` per weight tensor;
   - `padded`: rows are scattered into (E, capacity, ·), capacity = the largest count, and one
     `torch.bmm` per weight tensor multiplies every expert's block (zero rows are wasted work);
   - `segment`: rows stay sorted; the matrix multiplies run per contiguous expert segment (a
     Python loop over experts, but a single gather and scatter, unlike eager).
4. `combine`: out[t] = Σ_rows w_row · y_row. Weighted here (`weighted=True`): one
   (1 × slots)·(slots × d) product per token of the weights and the rows' outputs, gathered to the
   (token, slot) positions. Or the group has applied the weights where they cost less
   (`ExpertGroup.folds_routing_weight`: to the down projection's input of gated experts with
   f < d, w·W·h = W·(w·h); to the hyperbolic log map's per-row factor), and `combine` only sums:
   forward the gather and a sum over slots, backward one gather of the token gradients to the rows.
   Tokens reach their rows (`to_rows`) and rows their tokens by gathers, forward and backward: no
   index_add_, which is several times slower than a gather on CPU and non-deterministic on CUDA.

Host synchronisation. `sync_free=True` keeps every size on the device: a group's run is read
through a fixed-size window of all assignments (rows past the group's count are padding that
`grouped_mm` skips; the layout zeroes them in value and gradient), so nothing calls `.item()`,
`.tolist()` or `nonzero`. This is the GPU path, with the `grouped_mm` kernel. Otherwise the counts
are read to the host once per block (`exact` sizes: no padding rows), which costs nothing on CPU;
`padded` and `segment` need those sizes and so synchronise once per block on any device.

`resolve_kernel` turns the `model.moe.experts_backend` setting into a kernel: `grouped` is
grouped_mm, `auto` the kernel in `FASTEST`, a table filled from benchmarks/results/moe_block.md
(forward + backward of one block, measured per device and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import get_args

import torch
import torch.nn.functional as F

from asymoe.config.schema import ExpertKernel

KERNELS: tuple[str, ...] = get_args(ExpertKernel)
# Device types whose grouped_mm path keeps every size on the device (`sync_free`).
SYNC_FREE_DEVICES: frozenset[str] = frozenset({"cuda"})

# Fastest kernel per (device type, dtype). Measured (benchmarks/results/moe_block.md, Euclidean
# groups): CPU float32, where grouped_mm beat padded's batched GEMMs at both shapes in each of four
# runs on a quiet 2-core CPU over two sessions (1.10x vs 1.01x dense coarse, 0.74x vs 0.69x
# fine-grained; on a loaded machine padded had won), tied coarse (0.97x) but led fine-grained
# (0.69x vs 0.65x) on 2026-12-01 16:28, and led both in two runs at 18:21 and 18:42 (coarse 0.96x
# and 0.93x vs 0.95x and 0.89x, fine 0.74x and 0.73x vs 0.67x and 0.68x). Not measured, by
# analogy: CPU bfloat16 as padded (grouped_mm's CPU bf16 path unmeasured); CUDA grouped_mm, the
# kernel torch and transformers build for it (bf16/fp16 on SM >= 80), the only sync-free kernel.
FASTEST: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "grouped_mm",
    ("cpu", torch.bfloat16): "padded",
    ("cuda", torch.bfloat16): "grouped_mm",
    ("cuda", torch.float16): "grouped_mm",
}
FALLBACK: str = "padded"  # any other (device, dtype): needs no special kernel
# Where one group family is fastest on another path than FASTEST's: (family, device type, dtype) ->
# kernel or "eager". None at present. Poincaré on CPU float32 had its eager loop here (it beat
# every grouped kernel in two runs, coarse 468 vs 718 ms, fine 451 vs 480 ms) until its layer ran
# in fewer passes and took the routing weight inside the log map: in one interleaved run on
# 2026-12-01 grouped_mm took 302 vs 393 ms fine-grained and 445 vs 433 ms coarse.
FASTEST_FOR_FAMILY: dict[tuple[str, str, torch.dtype], str] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether this torch build has a grouped_mm kernel for the device, dtype and widths.

    CPU: float32, bfloat16, float16. CUDA: bfloat16/float16 on compute capability >= 8.0. Every
    width (rows of the weights and of the inputs) must make a 16-byte stride.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        ok = dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        ok = False
    element = torch.tensor([], dtype=dtype).element_size()
    return ok and all((dim * element) % 16 == 0 for dim in dims)


def resolve_kernel(
    backend: str, device: torch.device, dtype: torch.dtype, *dims: int, family: str | None = None
) -> str:
    """The kernel that `backend` (auto | grouped | a kernel name) means for this device, dtype and widths.

    auto: the fastest measured for the group family (`FASTEST_FOR_FAMILY`, which may say "eager":
    the group runs its per-expert loop) or else for the device and dtype (`FASTEST`); grouped:
    torch's grouped_mm. A grouped_mm that the build lacks for the device, dtype or widths becomes
    `FALLBACK`.
    """
    if backend == "auto":
        kernel = FASTEST_FOR_FAMILY.get((family, device.type, dtype)) or FASTEST.get((device.type, dtype), FALLBACK)
        if kernel == "eager":
            return kernel
    else:
        kernel = "grouped_mm" if backend == "grouped" else backend
    assert kernel in KERNELS, f"unknown expert kernel {kernel!r}"
    if kernel == "grouped_mm" and not grouped_mm_supported(device, dtype, *dims):
        return FALLBACK
    return kernel


# ----------------------------------------------------------------------------- sorting


@dataclass
class Assignments:
    """A block's routing assignments ordered by global expert (A = tokens × slots entries)."""

    slots: int
    position: torch.Tensor  # (A,) long: the (token, slot) position token·slots + slot of each assignment
    expert_index: torch.Tensor  # (A,) long: its global expert; unused slots are `num_experts` (last)
    weight: torch.Tensor  # (A,) routing weight, differentiable
    ends: torch.Tensor  # (E,) long: assignments to experts 0..e
    host_ends: list[int] | None  # `ends` on the host (exact sizes), None on the sync-free path


def sort_assignments(
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    slot_mask: torch.Tensor,
    num_experts: int,
    sync_free: bool = False,
) -> Assignments:
    """One stable argsort of all (token, slot) assignments by expert.

    expert_index, expert_weight, slot_mask: (tokens, slots), global expert ids. Stability keeps,
    within an expert, the token order, so each token's contributions are later summed in expert
    order as in the eager loop.
    """
    flat_expert = torch.where(slot_mask, expert_index, num_experts).reshape(-1)  # (A,)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_expert.device)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
    ends = counts[:num_experts].cumsum(0)  # (E,)
    return Assignments(
        slots=expert_index.shape[1],
        position=order,
        expert_index=flat_expert[order],
        weight=expert_weight.reshape(-1)[order],
        ends=ends,
        host_ends=None if sync_free else ends.tolist(),
    )


@dataclass(eq=False)
class ExpertRows:
    """The rows one expert group computes: its run of the sorted assignments (N rows).

    `position` and `row_of_position` map rows and (token, slot) positions onto each other, so
    that moving values between tokens and rows is a gather in both directions (`to_rows`,
    `combine`); a scatter-add (index_add_) is several times slower than a gather on CPU and
    non-deterministic on CUDA.
    """

    num_experts: int
    slots: int
    token_index: torch.Tensor  # (N,) long
    local_expert: torch.Tensor  # (N,) long, in [0, num_experts)
    weight: torch.Tensor  # (N,) routing weight; 0 on padding rows
    ends: torch.Tensor  # (num_experts,) long, local cumulative counts
    counts: list[int] | None  # per-expert counts on the host (exact sizes only)
    valid: torch.Tensor | None  # (N, 1) bool on the sync-free path: rows that are real assignments
    position: torch.Tensor  # (N,) long: each row's (token, slot) position; tokens·slots for padding rows
    row_of_position: torch.Tensor  # (tokens·slots,) long: the row at each position, N where none

    @property
    def sync_free(self) -> bool:
        return self.valid is not None

    @cached_property
    def token_route(self) -> Route:
        """tokens -> rows."""
        return Route(self.token_index, None)

    @cached_property
    def position_route(self) -> Route:
        """rows -> (token, slot) positions; positions outside the group read zeros."""
        return Route.of(self.row_of_position, self.position.shape[0], self.sync_free)

    @cached_property
    def row_route(self) -> Route:
        """(token, slot) positions -> rows; padding rows (sync-free) read zeros."""
        return Route.of(self.position, self.row_of_position.shape[0], self.sync_free)

    @cached_property
    def token_gradient_route(self) -> Route:
        """tokens -> rows for the gradient of `combine`: padding rows (sync-free) read zeros."""
        return Route(self.token_index, None if self.valid is None else ~self.valid.squeeze(-1))


def _rows(assignments: Assignments, window, num_experts: int, first_expert: int, valid, counts, ends) -> ExpertRows:
    position = assignments.position[window]
    weight = assignments.weight[window]
    if valid is not None:
        position = torch.where(valid.squeeze(-1), position, assignments.position.shape[0])
        weight = torch.where(valid.squeeze(-1), weight, 0.0)
    num_rows, num_positions = position.shape[0], assignments.position.shape[0]
    row_of_position = position.new_full((num_positions + 1,), num_rows)
    row_of_position[position] = torch.arange(num_rows, device=position.device)  # padding rows hit the extra slot
    return ExpertRows(
        num_experts=num_experts,
        slots=assignments.slots,
        token_index=position.clamp(max=max(num_positions - 1, 0)) // assignments.slots,
        local_expert=(assignments.expert_index[window] - first_expert).clamp(0, num_experts - 1),
        weight=weight,
        ends=ends,
        counts=counts,
        valid=valid,
        position=position,
        row_of_position=row_of_position[:num_positions],
    )


def group_rows(assignments: Assignments, first_expert: int, num_experts: int) -> ExpertRows:
    """Rows of the group whose global experts are first_expert .. first_expert + num_experts − 1."""
    last = first_expert + num_experts - 1
    ends = assignments.ends
    local_ends = ends[first_expert : last + 1]
    if assignments.host_ends is not None:
        host = assignments.host_ends
        start = host[first_expert - 1] if first_expert > 0 else 0
        counts = [host[e] - (host[e - 1] if e > 0 else 0) for e in range(first_expert, last + 1)]
        window = slice(start, host[last])
        return _rows(assignments, window, num_experts, first_expert, None, counts, local_ends - start)
    # Sync-free: a window of all A rows starting at the group's first row (a device scalar).
    total = assignments.position.shape[0]
    start = ends[first_expert - 1] if first_expert > 0 else ends.new_zeros(())
    index = torch.arange(total, device=ends.device)
    window = (start + index).clamp(max=max(total - 1, 0))
    valid = (index < ends[last] - start).unsqueeze(-1)  # (A, 1)
    return _rows(assignments, window, num_experts, first_expert, valid, None, local_ends - start)


@dataclass(frozen=True)
class Route:
    """A row index into n source rows in which any value ≥ n means "a row of zeros".

    `index` is clamped into range and `zero` names the output rows to zero afterwards: a long
    tensor of rows on the exact-sizes path (zeroing a few rows costs nothing), a bool mask on the
    sync-free one (no host sync), None when no entry reads the zero row. Cheaper than gathering
    from the values with a zero row appended, which copies all of them.
    """

    index: torch.Tensor
    zero: torch.Tensor | None

    @staticmethod
    def of(index: torch.Tensor, size: int, sync_free: bool) -> Route:
        reads_zero = index >= size
        clamped = index.clamp(max=max(size - 1, 0))
        if sync_free:
            return Route(clamped, reads_zero)
        zero = reads_zero.nonzero().squeeze(-1)
        return Route(clamped, zero if zero.numel() else None)


def _gather(values: torch.Tensor, route: Route) -> torch.Tensor:
    """[values; 0][index]: out-of-range entries read zeros."""
    if values.shape[0] == 0:
        return values.new_zeros(route.index.shape[0], *values.shape[1:])
    out = values.index_select(0, route.index)
    if route.zero is None:
        return out
    if route.zero.dtype == torch.bool:
        return out.masked_fill_(route.zero.view(-1, *[1] * (out.dim() - 1)), 0.0)
    out[route.zero] = 0.0
    return out


class _InjectiveGather(torch.autograd.Function):
    """out = [values; 0][index] where no row of values is read twice; the gradient is the inverse gather.

    `inverse` says where each row of values went (the zero row for a row that went nowhere), so the
    backward is a gather too, not the scatter-add of index_select's own backward.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, route: Route, inverse: Route) -> torch.Tensor:
        ctx.inverse = inverse
        return _gather(values, route)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.inverse), None, None


def sum_slots(values: torch.Tensor, slots: int) -> torch.Tensor:
    """Σ_s values[t, s] for values (tokens·slots, d) -> (tokens, d): `weighted_sum` with unit weights
    (1.8 against 2.4 ms for `.sum(1)` on CPU at 4096 × 4 × 256, one run). The weights are one
    (1, 1, slots) row broadcast over tokens; unit strides within it keep bmm on its fast path (a
    fully broadcast weight took 15 ms)."""
    return weighted_sum(values, values.new_ones(1, 1, slots).expand(values.shape[0] // slots, 1, slots), slots)


class _TokenGather(torch.autograd.Function):
    """tokens (T, d) -> rows (M, d), each row one token's copy; the gradient sums a token's copies.

    `from_positions` gives, for every (token, slot) position, the row holding that copy (the zero
    row for none): the backward gathers (T·slots, d) and sums over slots, without a scatter-add.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, route: Route, from_positions: Route, slots: int) -> torch.Tensor:
        ctx.from_positions, ctx.slots = from_positions, slots
        return _gather(tokens, route)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return sum_slots(_gather(grad, ctx.from_positions), ctx.slots), None, None, None


def to_rows(tokens: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """Each row's token: tokens (T, ...) -> (N, ...)."""
    if tokens.dim() == 1:
        return tokens.index_select(0, rows.token_index)
    flat = tokens.reshape(tokens.shape[0], -1)
    return _TokenGather.apply(flat, rows.token_route, rows.position_route, rows.slots).view(-1, *tokens.shape[1:])


class _SumAtPositions(torch.autograd.Function):
    """out[t] = Σ_s values[row(t, s)]: a gather to the (tokens·slots, d) positions, summed over slots.

    `to_positions` reads, for every position, its row (zeros for a position without one);
    `from_tokens` reads, for every row, its token. A row's gradient is its token's output gradient:
    one gather, where a weighted sum's backward took a gather through the positions and a batched
    outer product with the weights.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, to_positions: Route, from_tokens: Route, slots: int) -> torch.Tensor:
        ctx.from_tokens = from_tokens
        return sum_slots(_gather(values, to_positions), slots)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.from_tokens), None, None, None


def weighted_sum(values: torch.Tensor, weight: torch.Tensor, slots: int) -> torch.Tensor:
    """out[t] = Σ_s weight[t, s] · values[t, s] for values (tokens·slots, d), weight (tokens·slots,) -> (tokens, d).

    One batched (1 × slots)·(slots × d) product per token, in the values' dtype with autocast off:
    forward and backward are each one pass over the values, where a product followed by a sum is
    two forward and three backward (measured 2x faster on CPU at 16k × 256).
    """
    with torch.autocast(device_type=values.device.type, enabled=False):
        per_token = values.view(-1, slots, values.shape[-1])  # (tokens, slots, d)
        return torch.bmm(weight.to(values.dtype).view(-1, 1, slots), per_token).squeeze(1)


def combine(rows: ExpertRows, outputs: torch.Tensor, dtype: torch.dtype, weighted: bool) -> torch.Tensor:
    """out[t] = Σ over rows r of token t of weight_r · outputs_r, outputs (N, d) -> (tokens, d);
    weighted=False: the outputs carry their weights already (`ExpertLayout.row_weight`).

    Tokens without rows get exact zeros; a token's rows are summed in its slot order.
    """
    if not weighted:
        return _SumAtPositions.apply(outputs.to(dtype), rows.position_route, rows.token_gradient_route, rows.slots)
    at_positions = _InjectiveGather.apply(outputs.to(dtype), rows.position_route, rows.row_route)  # (tokens·slots, d)
    weight = _InjectiveGather.apply(rows.weight, rows.position_route, rows.row_route)  # (tokens·slots,)
    return weighted_sum(at_positions, weight, rows.slots)


def row_values(rows: ExpertRows, per_token_expert: torch.Tensor) -> torch.Tensor:
    """Entries [token, local expert] of a (tokens, experts) tensor for every row, shape (N,)."""
    flat = rows.token_index * rows.num_experts + rows.local_expert
    return per_token_expert.reshape(-1)[flat]


# ----------------------------------------------------------------------------- layouts


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would use here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertLayout:
    """Rows of one group arranged for a kernel; `linear` applies per-expert weights to all rows.

    `gather` brings per-token tensors (T, ·) into the layout and `combine` sums the layout's
    outputs back into tokens with the routing weights (or outputs already scaled by `row_weight`,
    the routing weights in the layout); `pack` / `unpack` do the same for per-row tensors (N, ·).
    Element-wise and row-wise functions (activations, norms, hyperbolic maps) act on the layout
    directly. `per_expert(values)` broadcasts a per-expert tensor (E, ...) against it.
    """

    def __init__(self, rows: ExpertRows):
        self.rows = rows

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token values (T, ...) -> the layout: each row's token."""
        return self.pack(to_rows(tokens, self.rows))

    def combine(self, outputs: torch.Tensor, dtype: torch.dtype, weighted: bool) -> torch.Tensor:
        """The layout's outputs -> (T, d): each token's routing-weighted sum over its rows
        (weighted=False: a plain sum of outputs that carry their weights)."""
        return combine(self.rows, self.unpack(outputs), dtype, weighted)

    def row_weight(self) -> torch.Tensor:
        """Each row's routing weight against the layout's rows, (N, 1); 0 on padding rows."""
        return self.rows.weight.unsqueeze(-1)

    def per_expert(self, values: torch.Tensor) -> torch.Tensor:
        """(E, ...) -> (N, ...): each row's expert's entry."""
        return values.index_select(0, self.rows.local_expert)

    def expert_segments(self) -> list[int] | None:
        """The rows of each expert, in order, where the layout's rows are sorted by expert with
        exact sizes: a per-expert value can then broadcast within each segment instead of being
        gathered to every row (`per_expert`). None on the sync-free path (sizes stay on the device)."""
        return self.rows.counts

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(type(self).__name__)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (layout, in) · weight[e]ᵀ (+ bias[e]) with weight (E, out, in) and bias (E, out).

        Computes in autocast's dtype where autocast is on, as F.linear does.
        """
        dtype = _compute_dtype(x, weight)
        return self.matmul(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class GroupedMMLayout(ExpertLayout):
    """Sorted rows, one `grouped_mm` per weight tensor."""

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        valid = self.rows.valid
        if valid is not None:
            # Padding rows: grouped_mm leaves them uninitialised in its output and in the input
            # gradient; zeroing both keeps them out of every other value and gradient.
            x = x.masked_fill(~valid, 0.0)
        out = F.grouped_mm(x, weight.transpose(-2, -1), offs=self.rows.ends.to(torch.int32))
        if valid is not None:
            out = out.masked_fill(~valid, 0.0)
        return out if bias is None else out + self.per_expert(bias)


class SegmentLayout(ExpertLayout):
    """Sorted rows, one matrix multiply per contiguous expert segment."""

    def __init__(self, rows: ExpertRows):
        super().__init__(rows)
        assert rows.counts is not None, "the segment kernel needs exact sizes (sync_free=False)"

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # split, not slicing: its backward concatenates instead of zero-filling a full-size
        # gradient per expert.
        segments = x.split(self.rows.counts)
        biases = [None] * len(segments) if bias is None else bias.unbind(0)
        return torch.cat([F.linear(segment, weight[e], biases[e]) for e, segment in enumerate(segments)])


class PaddedLayout(ExpertLayout):
    """(E, capacity, ·) blocks, one batched matrix multiply per weight tensor.

    Tokens go straight into their slots and slot outputs straight back to (token, slot) positions
    (`gather`, `combine`): one gather each way, forward and backward, not two through the rows.
    Empty slots read token zeros (`token_route`), so they also take no gradient in `combine`.
    """

    def __init__(self, rows: ExpertRows):
        super().__init__(rows)
        assert rows.counts is not None, "the padded kernel needs exact sizes (sync_free=False)"
        self.capacity = max(rows.counts, default=0)
        num_rows, num_slots = rows.token_index.shape[0], rows.num_experts * self.capacity
        starts = rows.ends - torch.as_tensor(rows.counts, device=rows.ends.device)  # (E,)
        row = torch.arange(num_rows, device=rows.ends.device)
        # Row r of expert e goes to slot e·capacity + (r − start_e); empty slots read row N (zeros).
        slot = rows.local_expert * self.capacity + row - starts[rows.local_expert]  # (N,)
        slot_row = slot.new_full((num_slots,), num_rows)
        slot_row[slot] = row
        num_positions = rows.row_of_position.shape[0]
        slot_position = torch.cat([rows.position, rows.position.new_full((1,), num_positions)])[slot_row]
        num_tokens = num_positions // rows.slots
        slot_token = torch.cat([rows.token_index, rows.token_index.new_full((1,), num_tokens)])[slot_row]
        position_slot = torch.cat([slot, slot.new_full((1,), num_slots)])[rows.row_of_position]
        self.slot_route = Route.of(slot_row, num_rows, False)  # rows -> slots
        self.row_route = Route(slot, None)  # slots -> rows
        self.token_route = Route.of(slot_token, num_tokens, False)  # tokens -> slots
        self.position_route = Route.of(position_slot, num_slots, False)  # slots -> (token, slot) positions
        self.inverse_position_route = Route.of(slot_position, num_positions, False)  # positions -> slots
        self.slot_weight = torch.cat([rows.weight, rows.weight.new_zeros(1)])[slot_row]  # (E·C,), 0 on empty slots

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(self.rows.num_experts, self.capacity, *flat.shape[1:])  # (E, C, ·)

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        return self._blocks(_InjectiveGather.apply(values, self.slot_route, self.row_route))

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(-1, *values.shape[2:])
        return _InjectiveGather.apply(flat, self.row_route, self.slot_route)  # (N, ·)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 1:
            return self.pack(to_rows(tokens, self.rows))
        flat = tokens.reshape(tokens.shape[0], -1)
        slots = _TokenGather.apply(flat, self.token_route, self.position_route, self.rows.slots)
        return self._blocks(slots.view(-1, *tokens.shape[1:]))

    def combine(self, outputs: torch.Tensor, dtype: torch.dtype, weighted: bool) -> torch.Tensor:
        flat = outputs.reshape(-1, outputs.shape[-1]).to(dtype)  # (E·C, d)
        if not weighted:
            return _SumAtPositions.apply(flat, self.position_route, self.token_route, self.rows.slots)
        at_positions = _InjectiveGather.apply(flat, self.position_route, self.inverse_position_route)
        weight = _InjectiveGather.apply(self.slot_weight, self.position_route, self.inverse_position_route)
        return weighted_sum(at_positions, weight, self.rows.slots)

    def row_weight(self) -> torch.Tensor:
        return self._blocks(self.slot_weight).unsqueeze(-1)  # (E, C, 1), 0 on empty slots

    def per_expert(self, values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(1)  # (E, 1, ...)

    def expert_segments(self) -> None:
        return None  # (E, C, ·) blocks: `per_expert` already broadcasts

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return torch.bmm(x, weight.transpose(-2, -1))  # (E, C, out)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(-2, -1))


LAYOUTS = {"grouped_mm": GroupedMMLayout, "padded": PaddedLayout, "segment": SegmentLayout}


def make_layout(kernel: str, rows: ExpertRows) -> ExpertLayout:
    return LAYOUTS[kernel](rows)
