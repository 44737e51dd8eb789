"""Sparse dispatch over stacked experts (design §3; methods-routing §0.1).

Kept (token, expert, gate) assignments are sorted by expert; the tokens are gathered once into a contiguous
`[N, D]` block; every expert runs its FFN on its own slice (one `addmm` per layer per expert, weights taken
from the stacked `[E, D, H]` / `[E, H, O]` tensors of `StackedExperts`); the rows are scaled by their gates
and scatter-added back to `[T, O]`. No `[T, E, C]` tensor is built and no expert sees a token it was not
given; dropped tokens simply have no assignment, so their output is exactly zero.

The whole layer (gather, per-expert FFN, gate, scatter) is one autograd node with a hand-written backward: it
allocates each big buffer once, reuses buffers in place, and writes each weight gradient straight into its
slice of the stacked gradient (no per-expert full-size zero tensors). Expert dropout (`dropout`, training
only) masks the hidden activation (Switch §2.3). Double backward is not supported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moecli.experts import ACTIVATIONS, StackedExperts


def _act_forward(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "tanh":
        return torch.tanh(h)
    return torch.sigmoid(h)


def _act_backward(name: str, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gradient through the activation given the pre-activation h (relu: given relu(h), the same mask)."""
    if name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, h, 0.0, grad_input=grad)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if name == "tanh":
        t = torch.tanh(h)
        return grad * (1 - t * t)
    s = torch.sigmoid(h)
    return grad * s * (1 - s)


_POOLS: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def one_thread(enabled: bool = True):
    """Run the enclosed small or memory-bound operations with one intra-op thread.

    Routing and gather/scatter cost little, but each operation above torch's grain size opens an OpenMP
    parallel region, and on a shared, oversubscribed machine with libgomp's default spin-waiting every region
    can wait a scheduler slice for its second thread. One thread keeps the MoE layer free of such regions; the
    expert GEMMs still use all threads through `for_each_expert`.
    """
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def for_each_expert(counts: list[int], body: Callable[[int, slice], None], parallel: bool = True) -> None:
    """Call `body(e, rows)` for every expert with rows, `rows` its contiguous slice of the sorted block.

    With T intra-op threads (torch.get_num_threads() > 1) the experts run on T worker threads, each with one
    intra-op thread, largest expert first: the experts' GEMMs then need no OpenMP barrier each (one join per
    pass instead of one parallel region per GEMM), which keeps the layer fast when libgomp spin-waits on a
    shared, oversubscribed machine. Each expert writes disjoint slices, so results do not depend on the
    schedule.
    """
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    work = sorted((e for e, n in enumerate(counts) if n > 0), key=lambda e: -counts[e])
    threads = torch.get_num_threads() if parallel else 1
    if threads <= 1 or len(work) <= 1:
        for e in work:
            body(e, slice(starts[e], starts[e + 1]))
        return
    queue = list(reversed(work))
    lock = threading.Lock()

    def worker() -> None:
        torch.set_num_threads(1)
        with torch.no_grad():  # grad mode is per thread; the expert bodies write into buffers with out=
            run_queue()

    def run_queue() -> None:
        while True:
            with lock:
                if not queue:
                    return
                e = queue.pop()
            body(e, slice(starts[e], starts[e + 1]))

    pool = _POOLS.get(threads) or _POOLS.setdefault(threads, ThreadPoolExecutor(threads, "moe-expert"))
    try:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    finally:
        torch.set_num_threads(threads)  # the workers' setting is process-wide for MKL; restore it


class _RoutedFFN(torch.autograd.Function):
    """out[t] = Σ_r gate_r · FFN_{e(r)}(x[token_r]) over rows r sorted by expert (`counts` rows per expert).

    Forward keeps xs `[N, D]`, the hidden buffer `[N, H]` (relu: the activation, in place; other activations:
    the pre-activation) and the unscaled expert output `[N, O]`; backward reuses buffers in place.
    """

    @staticmethod
    def forward(ctx, x, token, gate, counts, act, drop_masks, w1, b1, w2, b2):
        linear = w2 is None
        cpu = x.device.type == "cpu"
        with one_thread(cpu):
            xs = x.index_select(0, token)
        y = xs.new_empty(xs.shape[0], w1.shape[2] if linear else w2.shape[2])
        hidden = None if linear else xs.new_empty(xs.shape[0], w1.shape[2])

        def expert_forward(e: int, rows: slice) -> None:
            if linear:
                torch.addmm(b1[e], xs[rows], w1[e], out=y[rows])
                return
            h = torch.addmm(b1[e], xs[rows], w1[e], out=hidden[rows])
            a = h.clamp_min_(0.0) if act == "relu" else _act_forward(act, h)
            if drop_masks is not None:
                a = a * drop_masks[rows]
            torch.addmm(b2[e], a, w2[e], out=y[rows])

        for_each_expert(counts, expert_forward, xs.device.type == "cpu")
        with one_thread(cpu):
            out = x.new_zeros(x.shape[0], y.shape[1]).index_add_(0, token, y * gate.unsqueeze(1))
        ctx.counts, ctx.act, ctx.linear = counts, act, linear
        ctx.save_for_backward(xs, token, gate, y, hidden, drop_masks, w1, w2)
        return out

    @staticmethod
    def backward(ctx, gout):
        xs, token, gate, y, hidden, drop_masks, w1, w2 = ctx.saved_tensors
        cpu = xs.device.type == "cpu"
        with one_thread(cpu):
            gu = gout.index_select(0, token)  # [N, O]
            ggate = torch.linalg.vecdot(gu, y)  # saved tensors stay untouched (backward may run twice)
            gu.mul_(gate.unsqueeze(1))
        gw1, gb1 = torch.empty_like(w1), w1.new_empty(w1.shape[0], w1.shape[2])
        gw2 = None if ctx.linear else torch.empty_like(w2)
        gb2 = None if ctx.linear else w2.new_empty(w2.shape[0], w2.shape[2])
        gxs = gu if gu.shape[1] == xs.shape[1] else torch.empty_like(xs)
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (gw1, gb1, gw2, gb2):
                    if grad is not None:
                        grad[e].zero_()

        def expert_backward(e: int, rows: slice) -> None:
            g = gu[rows]
            if not ctx.linear:
                h = hidden[rows]
                a = h if ctx.act == "relu" else _act_forward(ctx.act, h)
                if drop_masks is not None:
                    a = a * drop_masks[rows]
                torch.mm(a.t(), g, out=gw2[e])
                torch.sum(g, 0, out=gb2[e])
                ga = torch.mm(g, w2[e].t())
                if drop_masks is not None:
                    ga.mul_(drop_masks[rows])
                g = _act_backward(ctx.act, ga, h)
            torch.mm(xs[rows].t(), g, out=gw1[e])
            torch.sum(g, 0, out=gb1[e])
            torch.mm(g, w1[e].t(), out=gxs[rows])  # may overwrite gu[rows], which is no longer needed

        for_each_expert(ctx.counts, expert_backward, xs.device.type == "cpu")
        with one_thread(cpu):
            gx = xs.new_zeros(gout.shape[0], xs.shape[1]).index_add_(0, token, gxs)
        return gx, None, ggate, None, None, None, gw1, gb1, gw2, gb2


class _PaddedFFN(torch.autograd.Function):
    """The same layer as `_RoutedFFN` with every expert's rows padded to the largest count M: one `baddbmm`
    per layer over `[E, M, ·]` (a handful of large operations whatever E is). Padding rows hold zeros, are
    never scattered back, and receive zero gradient, so they change nothing but the work done."""

    @staticmethod
    def forward(ctx, x, token, gate, slot, num_experts, rows_per_expert, act, w1, b1, w2, b2):
        e, m = num_experts, rows_per_expert
        xs = x.new_zeros(e * m, x.shape[1]).index_copy_(0, slot, x.index_select(0, token)).view(e, m, -1)
        h = torch.baddbmm(b1.unsqueeze(1), xs, w1)
        a = h.clamp_min_(0.0) if act == "relu" else _act_forward(act, h)
        y = torch.baddbmm(b2.unsqueeze(1), a, w2).view(e * m, -1).index_select(0, slot)  # [N, O]
        out = x.new_zeros(x.shape[0], y.shape[1]).index_add_(0, token, y * gate.unsqueeze(1))
        ctx.act, ctx.shape = act, (e, m)
        ctx.save_for_backward(xs, token, gate, slot, y, h, w1, w2)
        return out

    @staticmethod
    def backward(ctx, gout):
        xs, token, gate, slot, y, h, w1, w2 = ctx.saved_tensors
        e, m = ctx.shape
        gu = gout.index_select(0, token)
        ggate = torch.linalg.vecdot(gu, y)
        gu_pad = (
            gu.new_zeros(e * m, gu.shape[1]).index_copy_(0, slot, gu.mul_(gate.unsqueeze(1))).view(e, m, -1)
        )
        a = h if ctx.act == "relu" else _act_forward(ctx.act, h)
        gw2, gb2 = torch.bmm(a.transpose(1, 2), gu_pad), gu_pad.sum(1)
        g = _act_backward(ctx.act, torch.bmm(gu_pad, w2.transpose(1, 2)), h)
        gw1, gb1 = torch.bmm(xs.transpose(1, 2), g), g.sum(1)
        gxs = torch.bmm(g, w1.transpose(1, 2)).view(e * m, -1).index_select(0, slot)
        gx = gxs.new_zeros(gout.shape[0], gxs.shape[1]).index_add_(0, token, gxs)
        return gx, None, ggate, None, None, None, None, gw1, gb1, gw2, gb2


def _activation_name(experts: StackedExperts) -> str:
    for name, fn in ACTIVATIONS.items():
        if fn is experts.act:
            return name
    raise ValueError("unknown expert activation")


def routed_experts(
    x: torch.Tensor,
    token: torch.Tensor,
    expert: torch.Tensor,
    gate: torch.Tensor,
    experts: StackedExperts,
    dropout: float = 0.0,
    training: bool = False,
    mode: str = "segments",
) -> torch.Tensor:
    """Sparse MoE output `y_t = Σ_{(t, e, g)} g · FFN_e(x_t)` over kept assignments.

    x `[T, D]`; token, expert `[N]` long; gate `[N]` (differentiable); returns `[T, O]`, zero for tokens
    with no assignment. Sort by expert (stable: rows keep token order within an expert), then one fused node.
    mode "segments" (default): each expert on its own contiguous slice (`for_each_expert`); "padded": one
    batched matmul per layer over `[E, max count, ·]` (fewer, larger operations, e.g. for accelerators; it
    computes on padding rows, so on CPU it is slower when loads are uneven). Expert dropout uses "segments".
    """
    with one_thread(x.device.type == "cpu"):
        order = torch.argsort(expert, stable=True)
        token, gate = token[order], gate[order]
        counts = torch.bincount(expert, minlength=experts.num_experts).tolist()
    masks = None
    if dropout > 0 and training and experts.hidden > 0:
        keep = 1.0 - dropout
        masks = torch.bernoulli(x.new_full((token.shape[0], experts.hidden), keep)) / keep
    w2 = experts.w2 if experts.hidden > 0 else None
    b2 = experts.b2 if experts.hidden > 0 else None
    n, m = token.shape[0], max(counts) if counts else 0
    if mode == "padded" and masks is None and w2 is not None and n > 0:
        starts = torch.tensor([0] + counts[:-1], device=x.device).cumsum(0)
        expert_sorted = expert[order]
        slot = expert_sorted * m + torch.arange(n, device=x.device) - starts[expert_sorted]
        return _PaddedFFN.apply(
            x.contiguous(),
            token,
            gate.to(x.dtype),
            slot,
            experts.num_experts,
            m,
            _activation_name(experts),
            experts.w1,
            experts.b1,
            w2,
            b2,
        )
    return _RoutedFFN.apply(
        x.contiguous(),
        token,
        gate.to(x.dtype),
        counts,
        _activation_name(experts),
        masks,
        experts.w1,
        experts.b1,
        w2,
        b2,
    )
