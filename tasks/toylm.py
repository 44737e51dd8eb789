"""Toy byte-level language model with MoE feed-forward layers (methods-routing §1–2, 4–7; methods-classic §3).

A decoder-only pre-norm transformer (causal attention through `scaled_dot_product_attention`) over bytes
(vocabulary 256: no tokenizer, no download). Every `moe_every`-th feed-forward layer is a representation slot
(`ffn1`, `ffn3`, ... with 0-based layer numbers) taken by the chosen combiner; the others are plain FFNs of
width `d_ff`, the shape of one expert. `combiner=dense` therefore gives the plain transformer, and Switch
(top-1) has the dense model's FLOPs per token. `expert_hidden_divisor: k` shrinks each expert's hidden size to
`d_ff // k`, so a top-k layer keeps the dense model's active FLOPs.

Causality: tokens reach a combiner position-major (row `s·N + n` is position s of sequence n), and the slot
says `extra={"causal": True, "token_order": "position_major"}`. With that order a position-priority capacity
queue only lets a token compete with tokens at the same or earlier positions. Combiners that mix tokens inside
a group (expert choice, soft MoE) get `num_sequences=N` when their forward accepts it, so they can group one
position across the batch (methods-routing §4.4, §5.4), or refuse the causal slot.

Corpus: `pydoc_data.topics` (the English documentation shipped with CPython, about 0.46 M characters) or
`corpus=<file or folder of .txt>`; split contiguously into train / val / test by `split` fractions.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from moecli.errors import ConfigError, check_positive
from moecli.experts import MLP
from moecli.routing.stats import RoutingAccumulator, cv_squared
from moecli.slots import CombinerOutput, Slot
from moecli.task import CombinerFactory, StepOutput, Task

VOCAB = 256
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------- corpus
def default_corpus() -> bytes:
    """The pydoc topics text that ships with CPython, topics in sorted order, UTF-8 encoded."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def read_corpus(corpus: str | None) -> bytes:
    """Bytes of `corpus`: None = pydoc topics; a file; or every `*.txt` under a folder (sorted paths)."""
    if corpus is None:
        return default_corpus()
    path = Path(corpus).expanduser()
    if path.is_file():
        data = path.read_bytes()
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"task.corpus={corpus} is a folder without .txt files")
        data = b"\n\n".join(f.read_bytes() for f in files)
    else:
        raise ConfigError(f"task.corpus={corpus} is neither a file nor a folder")
    return data


def split_bytes(data: bytes, fractions) -> dict[str, torch.Tensor]:
    """Contiguous train / val / test byte tensors `[n]` (uint8), in that order through the corpus."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"task.split={fractions} must be three positive fractions (train, val, test) "
                          "summing to 1")
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n = len(whole)
    cut1 = int(n * fractions[0])
    cut2 = cut1 + int(n * fractions[1])
    return {"train": whole[:cut1].clone(), "val": whole[cut1:cut2].clone(), "test": whole[cut2:].clone()}


def eval_windows(data: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    """Start offsets `[W]` of non-overlapping windows spread evenly over `data`, `max_tokens` in all."""
    available = (len(data) - 1) // context
    count = max(1, min(available, max_tokens // context))
    if available < 1:
        raise ConfigError(f"a split of {len(data)} bytes is shorter than task.context + 1; "
                          "lower task.context")
    return (torch.arange(count) * available // count) * context


# ----------------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Causal multi-head self-attention. x `[N, S, D]` -> `[N, S, D]`."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, heads, S, D/heads]
        return self.out(y.transpose(1, 2).reshape(n, s, d))


class FeedForward(nn.Module):
    """A plain FFN or a combiner on a representation slot, applied to position-major tokens.

    x `[N, S, D]` -> (`[N, S, D]`, CombinerOutput or None). The combiner sees `[S·N, D]`, row `s·N + n`.
    """

    def __init__(self, net: nn.Module, moe: bool):
        super().__init__()
        self.net, self.moe = net, moe
        self.pass_groups = moe and "num_sequences" in inspect.signature(net.forward).parameters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, CombinerOutput | None]:
        if not self.moe:
            return self.net(x), None
        n, s, d = x.shape
        flat = x.transpose(0, 1).reshape(s * n, d)
        out = self.net(flat, num_sequences=n) if self.pass_groups else self.net(flat)
        return out.output.reshape(s, n, d).transpose(0, 1), out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn: FeedForward):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.ffn = Attention(d_model, n_heads), ffn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, CombinerOutput | None]:
        x = x + self.attn(self.ln1(x))
        y, out = self.ffn(self.ln2(x))
        return x + y, out


class ByteTransformer(nn.Module):
    """Decoder-only transformer over bytes. idx `[N, S]` (long) -> logits `[N, S, 256]` and the MoE outputs.

    `moe_layers` maps slot name -> its CombinerOutput from the last forward, in layer order (a returned value,
    not kept state).
    """

    def __init__(self, context: int, d_model: int, n_heads: int, ffns: list[tuple[str | None, FeedForward]]):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.names = [name for name, _ in ffns]
        self.blocks = nn.ModuleList([Block(d_model, n_heads, ffn) for _, ffn in ffns])
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, CombinerOutput]]:
        s = idx.shape[1]
        if s > self.context:
            raise ValueError(f"sequence of {s} tokens exceeds the context of {self.context}")
        x = self.embed(idx) + self.pos[:s]
        moe: dict[str, CombinerOutput] = {}
        for name, block in zip(self.names, self.blocks):
            x, out = block(x)
            if out is not None:
                moe[name] = out
        logits = self.ln_f(x) @ self.embed.weight.T  # tied input and output embeddings
        return logits, moe


def moe_layer_indices(n_layers: int, moe_every: int) -> list[int]:
    """0-based indices of the MoE layers: every `moe_every`-th FFN (1, 3, ... for 2, as GShard)."""
    return [i for i in range(n_layers) if (i + 1) % moe_every == 0]


@torch.no_grad()
def future_leak_rate(model: ByteTransformer, idx: torch.Tensor, trials: int, generator: torch.Generator,
                     atol: float = 1e-5) -> float:
    """How often an earlier position's logits change when one future byte changes (0.0 = causal).

    idx `[N, S]`. Each trial picks a position t ≥ 1 and replaces byte t in every sequence with a random other
    byte, then counts the (sequence, position < t) pairs whose logits moved by more than `atol`. Returns the
    fraction of such pairs over all trials. Runs in the model's current mode (eval for routing without noise).
    """
    base, _ = model(idx)
    changed, total = 0, 0
    for _ in range(trials):
        t = int(torch.randint(1, idx.shape[1], (), generator=generator))
        other = idx.clone()
        other[:, t] = (idx[:, t] + torch.randint(1, VOCAB, idx[:, t].shape, generator=generator)) % VOCAB
        logits, _ = model(other)
        moved = (logits[:, :t] - base[:, :t]).abs().amax(-1) > atol  # [N, t]
        changed += int(moved.sum())
        total += moved.numel()
    return changed / max(total, 1)


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(model: ByteTransformer, prompt: bytes, length: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, num_samples: int = 1) -> list[bytes]:
    """Sample `length` bytes after `prompt` for `num_samples` sequences, reproducibly under `seed`.

    Uses its own generator (the global RNG is untouched); temperature 0 = greedy. The window slides when the
    text outgrows the model's context. Returns the generated continuations (without the prompt).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = list(prompt) or [ord("\n")]
    idx = torch.tensor([start] * num_samples, dtype=torch.long, device=device)
    for _ in range(length):
        logits = model(idx[:, -model.context:])[0][:, -1].float().cpu()  # [N, 256]
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, VOCAB), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, nxt.to(device)], dim=1)
    model.train(was_training)
    return [bytes(row[len(start):].tolist()) for row in idx.cpu()]


# ------------------------------------------------------------------------------------------------------- task
class ToyLM(Task):
    """Byte-level next-token prediction; loss in nats per byte, `bpb` = bits per byte."""

    monitor = ("val/loss", "min")
    items_name = "tokens"

    def __init__(self, corpus: str | None = None, split=(0.9, 0.05, 0.05), context: int = 64,
                 batch_size: int = 32, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                 d_ff: int = 256,
                 moe_every: int = 2, expert_hidden_divisor: int = 1, eval_tokens: int = 16384,
                 sample_prompt: str = "The ", sample_length: int = 200, sample_temperature: float = 0.8,
                 sample_seed: int = 0):
        for key, value in [("context", context), ("batch_size", batch_size), ("d_model", d_model),
                           ("n_layers", n_layers), ("n_heads", n_heads), ("d_ff", d_ff),
                           ("moe_every", moe_every), ("expert_hidden_divisor", expert_hidden_divisor),
                           ("eval_tokens", eval_tokens)]:
            check_positive(f"task.{key}", value)
        check_positive("task.sample_length", sample_length, minimum=0)
        if d_model % n_heads:
            raise ConfigError(f"task.d_model={d_model} must be a multiple of task.n_heads={n_heads}")
        if moe_every > n_layers:
            raise ConfigError(f"task.moe_every={moe_every} leaves no MoE layer in task.n_layers={n_layers}; "
                              f"choose 1..{n_layers}")
        if d_ff // expert_hidden_divisor < 1:
            raise ConfigError(f"task.expert_hidden_divisor={expert_hidden_divisor} exceeds task.d_ff={d_ff}")
        self.corpus, self.split = corpus, tuple(split)
        self.context, self.batch_size = context, batch_size
        self.d_model, self.n_layers, self.n_heads, self.d_ff = d_model, n_layers, n_heads, d_ff
        self.moe_every, self.expert_hidden_divisor = moe_every, expert_hidden_divisor
        self.eval_tokens = eval_tokens
        self.sample_prompt, self.sample_length = sample_prompt, sample_length
        self.sample_temperature, self.sample_seed = sample_temperature, sample_seed
        self.data: dict[str, torch.Tensor] = {}
        self._clock = _StepClock()
        self._train_routing = RoutingWindow()

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, seed: int) -> None:
        """Read and split the corpus (the split is contiguous and does not depend on the seed)."""
        self.data = split_bytes(read_corpus(self.corpus), self.split)
        if len(self.data["train"]) <= self.context + 1:
            raise ConfigError(f"task.context={self.context} is longer than the training split "
                              f"({len(self.data['train'])} bytes)")
        self.steps_per_epoch = max(1, len(self.data["train"]) // (self.batch_size * self.context))

    def to(self, device: torch.device) -> None:
        self.data = {k: v.to(device) for k, v in self.data.items()}

    def slots(self) -> list[Slot]:
        hidden = self.d_ff // self.expert_hidden_divisor
        return [Slot(f"ffn{i}", "representation", in_dim=self.d_model, out_dim=self.d_model,
                     expert_hidden=hidden, extra={"causal": True, "token_order": "position_major"})
                for i in moe_layer_indices(self.n_layers, self.moe_every)]

    def build_model(self, make_combiner: CombinerFactory) -> ByteTransformer:
        slots = {int(s.name[3:]): s for s in self.slots()}
        ffns: list[tuple[str | None, FeedForward]] = []
        for i in range(self.n_layers):
            if i in slots:
                ffns.append((slots[i].name, FeedForward(make_combiner(slots[i]), moe=True)))
            else:
                plain = MLP(self.d_model, self.d_model, self.d_ff, "relu")
                ffns.append((None, FeedForward(plain, moe=False)))
        return ByteTransformer(self.context, self.d_model, self.n_heads, ffns)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets `[N, S]` (long) for windows starting at `starts` `[N]`."""
        offsets = torch.arange(self.context + 1, device=data.device)
        chunk = data[starts.to(data.device)[:, None] + offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        """`steps_per_epoch` batches of random windows, offsets drawn from `generator` only."""
        data = self.data["train"]
        high = len(data) - self.context - 1
        for _ in range(self.steps_per_epoch):
            yield self._windows(data, torch.randint(0, high + 1, (self.batch_size,), generator=generator))

    # ------------------------------------------------------------------------------------------ train / eval
    def training_step(self, model: nn.Module, batch) -> StepOutput:
        self._clock.tick()
        x, y = batch
        logits, moe = model(x)
        nll = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        losses = {"nll": nll}
        for name, out in moe.items():
            if out.aux_loss.requires_grad:
                losses[f"aux/{name}"] = out.aux_loss
        self._train_routing.add(moe)
        return StepOutput(losses, {"train/bpb": float(nll.detach()) / LN2}, num_items=y.numel())

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Mean next-byte loss and bits per byte over fixed windows of `split`; routing stats per layer."""
        self._clock.pause()
        data = self.data[split]
        starts = eval_windows(data, self.context, self.eval_tokens)
        total, count, routing = 0.0, 0, RoutingWindow()
        for chunk in starts.split(self.batch_size):
            x, y = self._windows(data, chunk)
            logits, moe = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
            count += y.numel()
            routing.add(moe)
        loss = total / count
        metrics = {f"{split}/loss": loss, f"{split}/bpb": loss / LN2}
        if split == "val":
            # Routing once per evaluation: on the validation windows, and (prefix train/) on the training
            # batches since the previous evaluation, i.e. the gate as trained (noise, jitter, training CF).
            metrics.update(routing.metrics())
            metrics.update({f"train/{k}": v for k, v in self._train_routing.metrics().items()})
            self._train_routing.stale = True
        return metrics

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        """Save the weights (for `moecli sample`) and a generated sample; report mean training throughput."""
        run_dir = Path(run_dir)
        torch.save(model.state_dict(), run_dir / "model.pt")
        extra = {}
        if self._clock.steps_per_s() is not None:
            extra["train/tokens_per_s"] = self._clock.steps_per_s() * self.batch_size * self.context
        if self.sample_length > 0:
            # Generate batch_size sequences together so that routers grouping one position across sequences
            # (expert choice, soft MoE) see the group size they were trained with; the first one is shown.
            with torch.random.fork_rng(devices=[]):
                texts = generate(model, self.sample_prompt.encode("utf-8"), self.sample_length,
                                 self.sample_temperature, seed=self.sample_seed, num_samples=self.batch_size)
            text = texts[0]
            sample = self.sample_prompt + text.decode("utf-8", errors="replace")
            (run_dir / "sample.txt").write_text(sample + "\n", encoding="utf-8")
            print(f"--- sample (seed {self.sample_seed}) ---\n{sample}\n---")
        return extra


class RoutingWindow:
    """Routing statistics of each MoE layer over a run of forward passes (one RoutingAccumulator per layer).

    Adds a per-batch statistic `cv_importance_batch` (CV of Σ_tokens weights within each batch, averaged over
    batches; Shazeer 2017's CV(Importance(X)) for a batch X). `stale` marks a reported window: the next `add`
    starts a new one, so a final evaluation right after a periodic one still sees the same window.
    """

    def __init__(self):
        self.accs: dict[str, RoutingAccumulator] = {}
        self.stale = False

    def add(self, moe: dict[str, CombinerOutput]) -> None:
        if self.stale:
            self.accs, self.stale = {}, False
        for name, out in moe.items():
            if out.weights is None:
                continue
            weights = out.weights.detach()
            acc = self.accs.setdefault(name, RoutingAccumulator(name, weights.shape[-1]))
            stats = {**{f"{k}_loss": v for k, v in out.losses.items()}, **out.stats,
                     "cv_importance_batch": cv_squared(weights.sum(0).double()).sqrt()}
            acc.add(weights, stats=stats)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for acc in self.accs.values():
            out.update(acc.metrics())
        return out


class _StepClock:
    """Training throughput measured between consecutive training steps, leaving out evaluation pauses.

    The trainer's own `train/<items>_per_s` spans whole logging intervals (evaluations included); this one
    counts only step-to-step gaps in which no evaluation ran.
    """

    def __init__(self):
        self.last: float | None = None
        self.seconds, self.steps = 0.0, 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds += now - self.last
            self.steps += 1
        self.last = now

    def pause(self) -> None:
        self.last = None

    def steps_per_s(self) -> float | None:
        """Steps per second, or None before two consecutive steps."""
        return self.steps / self.seconds if self.steps and self.seconds > 0 else None
