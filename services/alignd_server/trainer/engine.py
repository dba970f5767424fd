"""The training engine: one model, its optimizer and schedule, and the primitives on them.

Every call runs on the process's compute thread, one at a time. Forward passes use the model
in eval mode with gradients on (dropout off: a step is a deterministic function of the batch,
which makes gradient accumulation exactly equal to one large batch).

The model and its value head form one :class:`Network` module, so that one forward covers
everything trained and PyTorch's data-parallel engines can wrap it whole (``parallel``):

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel``. Its reducer all-reduces gradient
  buckets while the backward still runs (a communication hook sums instead of averaging,
  because each rank already weights its loss by its share of the batch); ``defer_sync``
  micro-batches run under ``no_sync``. DDP's reducer sums a parameter's whole ``.grad``, so
  gradients an earlier micro-batch of the step already summed would be summed again: after
  each synchronised backward they are set aside, and put back before the step.
* ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer block (the
  model's ``_no_split_modules``) and then on the network: each rank holds 1/N of the
  parameters, gradients and AdamW state as DTensors; gradient reduction is a sum-only
  reduce-scatter (gloo has no pre-multiplied sums). Only rank 0 reads the weights: the other
  ranks build the model on the meta device, and ``torch.distributed.checkpoint``'s
  ``set_model_state_dict(broadcast_from_rank0=True)`` fills every rank's shards from rank 0.

Packing (``spec.packing``, padding-free training): each batch's rows are laid end to end in
packed sequences (:func:`~alignd_server.common.forward.pack_rows`) and transformers' own
packed-sequence attention keeps them apart, so linear layers and the LM head see no padding.
With dense attention kernels (sdpa, eager) a packed sequence of width W still costs W² in
attention, so rows are grouped into sequences of at most a capacity that :meth:`capacity`
picks per batch by the estimated work; flash attention's variable-length kernel needs, and
gets, a single packed sequence. Initialize runs a small packed and padded forward and refuses
a model whose results differ (one whose attention ignores packed position ids, or whose head
post-processes logits).

Mixed precision: master weights and optimizer state are float32 always; a ``dtype`` of
bfloat16 or float16 is the compute dtype, through FSDP2's ``MixedPrecisionPolicy`` (parameters
cast per block, gradients reduced in float32) or ``torch.autocast`` otherwise. float16 gets no
dynamic loss scaling: a step whose gradients overflow is skipped (see :meth:`optim_step`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from alignd_server.common.errors import FailedPrecondition, InvalidArgument
from alignd_server.common.forward import (
    PackedBatch,
    pack_bins,
    pack_rows,
    packable,
    packed_sequence_scores,
    packed_token_stats,
    pad_right,
    sequence_scores,
    token_stats,
)
from alignd_server.common.models import (
    DTYPES,
    LoadedModel,
    load_causal_lm,
    load_sequence_classifier,
)
from alignd_server.trainer import lora
from alignd_server.trainer.losses import SPECS, LossInputs, LossOutput

CAUSAL_LM, CAUSAL_LM_VALUE, SEQUENCE_CLASSIFIER = (
    "causal_lm",
    "causal_lm_value",
    "sequence_classifier",
)
PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass
class InitSpec:
    """What Initialize asks for (validated by the servicer)."""

    path: str
    kind: str
    dtype: str = "float32"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    lora: lora.LoraSpec | None = None
    seed: int = 0
    packing: bool = False
    packing_tokens: int = 0
    """Most tokens per packed sequence; 0 = chosen per batch (:meth:`TrainerEngine.capacity`)."""


@dataclass
class Batch:
    """Decoded batch: token rows, prompt lengths and named inputs (numpy)."""

    rows: list[np.ndarray]
    prompts: np.ndarray  # (B,)
    completion_mask: list[np.ndarray] | None = None
    token_inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    sequence_inputs: dict[str, np.ndarray] = field(default_factory=dict)


def schedule_factor(spec: InitSpec, step: int) -> float:
    """lr / peak lr after ``step`` optimizer steps: linear warmup, then the decay shape."""
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.schedule == "constant":
        return 1.0
    span = max(spec.total_steps - spec.warmup_steps, 1)
    progress = min((step - spec.warmup_steps) / span, 1.0)
    shape = (
        1.0 - progress if spec.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    )
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


class Network(torch.nn.Module):
    """The trained modules as one: the transformers model and, for PPO, its value head.

    Its forward computes what a loss or Forward reads (:func:`token_stats` and values, or a
    classifier's scores) and returns a dict of tensors, which DDP and FSDP2 traverse to hook
    the backward.
    """

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Linear | None) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, ids, mask, lengths, prompts, *, classifier: bool, temperature: float,
                entropy: bool, mean_logprobs: bool, values: bool,
                packed: PackedBatch | None = None) -> dict:  # fmt: skip
        """A right-padded batch (``ids``, ``mask``, ``lengths``), or ``packed`` rows (then
        the first three are None)."""
        if classifier:
            if packed is not None:
                return {"rewards": packed_sequence_scores(self.model, packed)}
            return {"rewards": sequence_scores(self.model, ids, mask, lengths)}
        options = {"temperature": temperature, "entropy": entropy,
                   "mean_logprobs": mean_logprobs, "hidden": values}  # fmt: skip
        if packed is not None:
            stats = packed_token_stats(self.model, packed, prompts, **options)
        else:
            stats = token_stats(self.model, ids, mask, lengths, prompts, **options)
        out = {"mask": stats.mask, "logprobs": stats.logprobs, "entropy": stats.entropy,
               "mean_logprobs": stats.mean_logprobs}  # fmt: skip
        if values:
            out["values"] = self.value_head(stats.hidden)[..., 0].float() * stats.mask
        return out


def _sum_gradients(state, bucket):
    """DDP communication hook: sums a bucket over ranks (the default hook averages)."""
    future = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes transformers says must not be
    split across devices (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` held by this rank (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def load_model(spec: InitSpec, device: str, meta: bool = False) -> LoadedModel:
    """The model ``spec`` names, in float32 on ``device``; with ``meta``, its structure only
    (on the meta device, no weights read: an FSDP rank that gets its shards from rank 0)."""
    load = load_sequence_classifier if spec.kind == SEQUENCE_CLASSIFIER else load_causal_lm
    return load(spec.path, dtype="float32", device=device, meta=meta)


class TrainerEngine:
    """A loaded model with AdamW, a schedule and accumulated gradients.

    ``parallel`` is how the model is spread over the ranks of the initialized process group
    (``none`` for one process; see the module docstring). The model is held in float32;
    ``spec.dtype`` is the compute dtype. ``loaded`` is the model when the caller loaded it
    (:func:`load_model`; under FSDP, on the meta device on every rank but 0).
    """

    def __init__(
        self, spec: InitSpec, device: str = "cpu", parallel: str = "none",
        loaded: LoadedModel | None = None,
    ) -> None:  # fmt: skip
        if parallel not in PARALLEL_MODES:
            raise InvalidArgument("parallel", f"{parallel!r} is not one of {PARALLEL_MODES}")
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.device = device
        self.parallel = parallel
        self.compute_dtype = DTYPES[spec.dtype]
        self.loaded: LoadedModel = loaded or load_model(spec, device)
        self.model = self.loaded.model
        meta = self.model.device.type == "meta"
        if spec.lora is not None:
            lora.apply(self.model, spec.lora, spec.seed)
        if spec.gradient_checkpointing:
            # Non-reentrant checkpointing: the form DDP and FSDP2 support.
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
            if spec.lora is not None:  # frozen embeddings: checkpointed blocks need input grads
                self.model.enable_input_require_grads()
        self.value_head: torch.nn.Linear | None = None
        if spec.kind == CAUSAL_LM_VALUE:
            hidden = self.model.config.hidden_size
            self.value_head = torch.nn.Linear(
                hidden, 1, device="meta" if meta else device, dtype=torch.float32
            )
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
            torch.nn.init.zeros_(self.value_head.bias)
        self.network = Network(self.model, self.value_head)
        self.wrapped: torch.nn.Module = self._wrap(parallel)
        """What forwards go through: the network, or its DDP wrapper (FSDP2 changes the
        network in place)."""
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        # The fused kernel updates every tensor in one pass (~3x faster steps on CPU).
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=spec.lr, betas=spec.betas, eps=spec.eps,
            weight_decay=spec.weight_decay, fused=torch.device(device).type in ("cpu", "cuda"),
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule_factor(spec, step)
        )
        self.step = 0
        self.accumulated = 0
        self.deferred = False
        """The last ForwardBackward deferred its gradient reduction (``defer_sync``)."""
        self.reduced: list[torch.Tensor | None] = [None] * len(self.parameters)
        """DDP: the step's gradients already summed over the ranks, set aside by parameter."""
        self.pushed_version = 0
        self.rank_bytes: tuple[list[int], list[int]] = ([], [])
        """Every rank's parameter and optimizer bytes (by rank), measured by the executor."""
        attention = str(getattr(self.model.config, "_attn_implementation", "") or "")
        self.varlen = "flash" in attention
        """The attention kernel takes packed rows of any length at their own cost (flash
        attention's variable-length path): every row goes in one packed sequence."""
        self.attention_span = _attention_span(self.model)
        if spec.packing:
            self._check_packing()

    def _check_packing(self) -> None:
        """Packing must reproduce the padded forward: a model that cannot pack is refused."""
        classifier = self.spec.kind == SEQUENCE_CLASSIFIER
        why = packable(self.model, classifier)
        if why is None and self.varlen and self.spec.packing_tokens:
            why = (f"its {self.model.config._attn_implementation} attention takes every row in "
                   "one packed sequence; leave max_tokens 0")  # fmt: skip
        if why is None:
            vocab = self.model.get_input_embeddings().num_embeddings
            rows = [np.random.default_rng(0).integers(0, vocab, n) for n in (6, 4, 3)]
            probe = Batch(rows=rows, prompts=np.array([2, 1, 1]))
            padded = self._run(probe, 1.0, False, set(), packed=False)
            packed = self._run(probe, 1.0, False, set(), packed=True, capacity=10)
            key = "rewards" if classifier else "logprobs"
            gap = float((padded[key] - packed[key]).abs().max())
            tolerance = 1e-3 if self.compute_dtype == torch.float32 else 5e-2
            if not gap <= tolerance:
                why = (f"{type(self.model).__name__} gives other {key} packed than padded "
                       f"(largest difference {gap:.3g} > {tolerance:g}): its attention or "
                       "head does not follow packed position ids")  # fmt: skip
        if why is not None:
            raise InvalidArgument("packing", f"cannot pack this model: {why}; train it unpacked")

    def capacity(self, lengths: list[int]) -> int:
        """Most tokens per packed sequence for rows of ``lengths``.

        ``spec.packing_tokens`` when set (at least the longest row); with a variable-length
        attention kernel, every row together. Otherwise the capacity whose first-fit
        decreasing packing has the least estimated work: n sequences of width W cost
        n · W · (1 + W / span) — the linear layers per token, plus dense attention over the
        width, span being how many keys cost one token's linear layers
        (:func:`_attention_span`). Candidates run from the longest row upwards by factors
        of √2 to all rows together.
        """
        longest, total = max(lengths), sum(lengths)
        if self.spec.packing_tokens:
            return max(self.spec.packing_tokens, longest)
        if self.varlen:
            return total
        best, best_cost = longest, math.inf
        candidate = float(longest)
        while True:
            cap = min(int(candidate), total)
            groups = pack_bins(lengths, cap)
            width = max(sum(lengths[i] for i in g) for g in groups)
            cost = len(groups) * width * (1 + width / self.attention_span)
            if cost < best_cost:
                best, best_cost = cap, cost
            if cap >= total:
                return best
            candidate *= math.sqrt(2)

    def _wrap(self, parallel: str) -> torch.nn.Module:
        if parallel == "ddp":
            cuda = torch.device(self.device).type == "cuda"
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[torch.device(self.device)] if cuda else None,
                broadcast_buffers=False,  # no buffer changes in training: no collective in Forward
            )  # fmt: skip
            ddp.register_comm_hook(None, _sum_gradients)
            return ddp
        if parallel == "fsdp":
            from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy()
            if self.compute_dtype != torch.float32:
                policy = MixedPrecisionPolicy(
                    param_dtype=self.compute_dtype, reduce_dtype=torch.float32
                )
            if self.spec.lora is not None:
                lora.check_shardable(self.model)
            rank0 = torch.distributed.get_rank() == 0
            whole = self.network.state_dict() if rank0 else {}  # held until broadcast
            for block in _blocks(self.model):
                fully_shard(block, mp_policy=policy)
            fully_shard(self.network, mp_policy=policy)
            for module in self.network.modules():  # each block's setting is its own
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)
                    module.set_gradient_divide_factor(1.0)  # sum: the losses are weighted
            self._distribute(whole)
            return self.network
        return self.network

    def _distribute(self, whole: dict[str, torch.Tensor]) -> None:
        """FSDP: the other ranks built the network on the meta device; rank 0, which loaded
        the weights (``whole``, its state_dict from before sharding), broadcasts them and
        every rank keeps its shards (``set_model_state_dict`` with ``broadcast_from_rank0``:
        one tensor in flight at a time). Buffers are broadcast too — rotary frequencies and
        other non-persistent buffers are in no state_dict, and ``to_empty`` leaves them
        uninitialised."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        if any(p.device.type == "meta" for p in self.network.parameters()):
            self.network.to_empty(device=self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.network, whole, options=options)
        for buffer in self.network.buffers():
            torch.distributed.broadcast(buffer, src=0)

    @property
    def sharded(self) -> bool:
        """Parameters are DTensor shards (FSDP2): gathering them is a collective."""
        return self.parallel == "fsdp"

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained parameters by their names in the network, in the optimizer's order."""
        return [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]

    def full_weights(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The policy's (or classifier's) whole weights by their transformers names, LoRA
        adapters merged. Under FSDP every rank must call it (each tensor is all-gathered in
        turn; ranks with ``keep`` false drop it at once and get ``{}``)."""
        if not self.sharded:
            return lora.merged_weights(self.model)
        return lora.merged_weights(self.model, full=_full_tensor, keep=keep)

    def full_value_head(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """The value head's whole tensors (a collective under FSDP, like :meth:`full_weights`)."""
        if self.value_head is None:
            return None
        tensors = {n: _full_tensor(p.detach()) for n, p in self.value_head.named_parameters()}
        return tensors if keep else {}

    def parameter_bytes(self) -> int:
        """Bytes of parameters (trained and frozen) this rank holds."""
        return local_bytes(self.network.parameters())

    def optimizer_bytes(self) -> int:
        """Bytes of AdamW state this rank holds (none before the first step)."""
        return local_bytes(
            v for state in self.optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)
        )  # fmt: skip

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool):
        """Within it, backward passes reduce gradients over ranks only when ``sync``."""
        if self.parallel == "ddp" and not sync:
            with self.wrapped.no_sync():
                yield
        elif self.parallel == "fsdp":
            self.network.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                self.network.set_requires_gradient_sync(True)
        else:
            yield

    def _autocast(self):
        if self.compute_dtype == torch.float32 or self.parallel == "fsdp":
            return contextlib.nullcontext()  # FSDP2's policy casts the parameters itself
        return torch.autocast(torch.device(self.device).type, dtype=self.compute_dtype)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _run(self, batch: Batch, temperature: float, grad: bool, needs: set[str], *,
             packed: bool, capacity: int | None = None, module=None) -> dict:  # fmt: skip
        """The network's float32 outputs on ``batch``, padded or packed (``capacity``: the
        packing's, default :meth:`capacity`)."""
        pad = self.loaded.tokenizer.pad_token_id
        prompts = torch.as_tensor(batch.prompts, device=self.device)
        if packed:
            cap = capacity or self.capacity([len(r) for r in batch.rows])
            packing, tensors = pack_rows(batch.rows, pad, cap, self.device), (None, None, None)
        else:
            packing, tensors = None, pad_right(batch.rows, pad, self.device)
        with torch.set_grad_enabled(grad), self._autocast():
            out = (module or self.network)(
                *tensors, prompts, classifier=self.spec.kind == SEQUENCE_CLASSIFIER,
                temperature=temperature, entropy="entropy" in needs,
                mean_logprobs="mean_logprobs" in needs, values="values" in needs, packed=packing,
            )  # fmt: skip
        return {k: v.float() if v is not None else None for k, v in out.items()}

    def _inputs(self, batch: Batch, temperature: float, grad: bool, needs: set[str]) -> LossInputs:
        """The tensors a loss (or Forward) reads; of the statistics ``entropy``,
        ``mean_logprobs`` and ``values`` only those in ``needs`` are computed."""
        out = self._run(batch, temperature, grad, needs, packed=self.spec.packing,
                        module=self.wrapped)  # fmt: skip
        classifier = self.spec.kind == SEQUENCE_CLASSIFIER
        if classifier:
            return LossInputs(None, None, rewards=out["rewards"],
                              sequence_inputs=_sequence(batch, self.device))  # fmt: skip
        token_mask = out["mask"]
        if batch.completion_mask is not None:
            token_mask = token_mask * _pad(batch.completion_mask, token_mask.shape, self.device)
        return LossInputs(
            out["logprobs"], token_mask, values=out.get("values"), entropy=out["entropy"],
            mean_logprobs=out["mean_logprobs"],
            token_inputs={k: _pad(v, token_mask.shape, self.device)
                          for k, v in batch.token_inputs.items()},
            sequence_inputs=_sequence(batch, self.device),
        )  # fmt: skip

    def check_loss(self, loss: str) -> None:
        """The model kind must be one that can compute ``loss`` (its spec's ``model``)."""
        model = SPECS[loss].model
        if self.spec.kind not in model.kinds:
            raise InvalidArgument("loss", f"{loss} needs {model.described}, not a {self.spec.kind}")

    def compute_loss(self, batch: Batch, loss: str, params: dict, temperature: float) -> LossOutput:
        """Computes ``loss`` on ``batch``, keeping the graph for :meth:`backward`."""
        self.check_loss(loss)
        lora.set_dropout(self.model, self.spec.lora is not None and self.spec.lora.dropout > 0)
        spec = SPECS[loss]
        inputs = self._inputs(batch, temperature, grad=True, needs=spec.needs(params))
        output = spec.fn(inputs, **params)
        if not torch.isfinite(output.loss):
            lora.set_dropout(self.model, False)
            raise InvalidArgument(
                "batch", f"the {loss} loss is {float(output.loss.detach())}; no gradient kept"
            )
        return output

    def backward(self, output: LossOutput, scale: float, defer_sync: bool = False) -> int:
        """Accumulates the gradients of ``scale`` × the loss; returns the batches accumulated."""
        try:
            (output.loss * scale).backward()
        finally:
            lora.set_dropout(self.model, False)
        self.accumulated += 1
        self.deferred = defer_sync
        if self.parallel == "ddp" and not defer_sync:
            self._set_aside_reduced()
        return self.accumulated

    def _set_aside_reduced(self) -> None:
        for i, parameter in enumerate(self.parameters):
            if parameter.grad is not None:
                kept = self.reduced[i]
                self.reduced[i] = parameter.grad if kept is None else kept.add_(parameter.grad)
                parameter.grad = None

    def drop_gradients(self) -> None:
        """Forgets every accumulated gradient (after a step, a skipped step or a load)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.reduced = [None] * len(self.parameters)
        self.accumulated, self.deferred = 0, False

    def forward_backward(
        self, batch: Batch, loss: str, params: dict, scale: float, temperature: float,
        defer_sync: bool = False,
    ) -> tuple[LossOutput, int]:  # fmt: skip
        """Computes ``loss`` on ``batch`` and accumulates its gradients."""
        output = self.compute_loss(batch, loss, params, temperature)
        return output, self.backward(output, scale, defer_sync)

    def check_step(self) -> None:
        """OptimStep's preconditions: gradients accumulated, the last reduction not deferred."""
        if self.accumulated == 0:
            raise FailedPrecondition("no gradients accumulated: call ForwardBackward first")
        if self.deferred:
            raise FailedPrecondition(
                "the last ForwardBackward set defer_sync, so its gradients were not reduced "
                "over the ranks: send the last micro-batch without defer_sync, then OptimStep "
                "(the accumulated gradients are kept)"
            )

    def optim_step(self) -> tuple[float, float, int]:
        """Clips, steps, schedules and zeroes; returns (grad norm, lr used, step).

        A non-finite gradient norm (an overflow) skips the step, as the peers' skip-on-inf/nan
        options do: the gradients are dropped, the weights, optimizer and schedule stay as they
        were, and the call fails with FAILED_PRECONDITION stating the norm.
        """
        self.check_step()
        for parameter, reduced in zip(self.parameters, self.reduced, strict=True):
            if reduced is not None:  # DDP: no deferred gradients are left (check_step)
                parameter.grad = reduced
        self.reduced = [None] * len(self.parameters)
        grads = [p.grad for p in self.parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)  # () tensor (a DTensor under FSDP)
        norm = float(_full_tensor(total))
        if not math.isfinite(norm):
            self.drop_gradients()
            raise FailedPrecondition(
                f"gradient norm is {norm}: the step was skipped and the gradients dropped "
                "(weights unchanged); lower the learning rate or loss_scale, or check the batch"
            )
        if self.spec.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(self.parameters, self.spec.max_grad_norm, total)
        lr = self.learning_rate
        self.optimizer.step()
        self.scheduler.step()
        self.drop_gradients()
        self.step += 1
        return norm, lr, self.step

    def forward(self, batch: Batch, outputs: set[str], temperature: float) -> dict[str, list]:
        """No-grad outputs: per-token logprobs/values/entropy rows, or (B,) rewards."""
        if "rewards" in outputs and self.spec.kind != SEQUENCE_CLASSIFIER:
            raise InvalidArgument("outputs", "rewards need a sequence_classifier model")
        if outputs - {"rewards"} and self.spec.kind == SEQUENCE_CLASSIFIER:
            raise InvalidArgument("outputs", "a sequence_classifier has only rewards")
        if "values" in outputs and self.value_head is None:
            raise InvalidArgument("outputs", "values need a causal_lm_value model")
        lora.set_dropout(self.model, False)
        inputs = self._inputs(batch, temperature, grad=False, needs=outputs)
        if self.spec.kind == SEQUENCE_CLASSIFIER:
            return {"rewards": inputs.rewards.detach().cpu().numpy()}
        lengths = [len(r) - int(p) for r, p in zip(batch.rows, batch.prompts, strict=True)]
        result = {}
        for name, tensor in (("logprobs", inputs.logprobs), ("values", inputs.values),
                             ("entropy", inputs.entropy)):  # fmt: skip
            if name in outputs:
                array = tensor.detach().float().cpu().numpy()
                result[name] = [array[b, :n] for b, n in enumerate(lengths)]
        return result


def _attention_span(model: torch.nn.Module) -> float:
    """Keys whose dense attention costs as much as one token through a block's linear layers:
    a block's weights P take 2P FLOPs a token, attention 4 · h FLOPs a (query, key) pair, h
    the query heads' width, so span = P / (2h). Without blocks to measure, P ≈ 12 · hidden²
    (span 6 · hidden)."""
    config = model.config
    hidden = getattr(config, "hidden_size", None) or 768
    heads = getattr(config, "num_attention_heads", None)
    width = heads * (getattr(config, "head_dim", None) or hidden // heads) if heads else hidden
    blocks = _blocks(model)
    weights = sum(p.numel() for p in blocks[0].parameters()) if blocks else 12 * hidden**2
    return max(weights / (2 * width), 1.0)


def _pad(rows: list[np.ndarray], shape: torch.Size, device: str) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.as_tensor(np.asarray(row, dtype=np.float32), device=device)
    return out


def _sequence(batch: Batch, device: str) -> dict[str, torch.Tensor]:
    return {
        k: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
        for k, v in batch.sequence_inputs.items()
    }
