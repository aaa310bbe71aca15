"""Predicted and measured peak memory of one training step of a reference workload: what ``torchledger measure``
reports and what the memory verification tests compare.

A case names a workload (a transformer preset, ``mlp`` or ``cnn``), its batch and a :class:`TrainConfig`. Warm-up
steps create the optimizer state (one, or as many as GradScaler skips while it lowers its initial scale); the next
step is measured (steady state, as the prediction assumes):
with the CUDA allocator on CUDA, with the live-storage tracker on the CPU, and under ``FakeTensorMode`` for the
simulated path, which allocates nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchledger.formulas.peak import (
    InferencePeak,
    TrainPeak,
    cnn_train_peak_bytes,
    inference_peak_bytes,
    mlp_train_peak_bytes,
    train_peak_bytes,
)
from torchledger.formulas.specs import PRESETS, CNNSpec, MLPSpec, ModelSpec, get_preset
from torchledger.formulas.timeline_hf import hf_profile_or_none, hf_train_peak_bytes
from torchledger.formulas.vocabulary import REFERENCE_WORKLOADS
from torchledger.measuring.memory import (
    MemoryMeasurement,
    StorageTracker,
    cuda_allocated,
    cuda_warmup,
    measure_cpu,
    measure_cuda,
)
from torchledger.workloads.models import CNN, MLP, MoE, build_transformer, token_batch
from torchledger.workloads.train_step import (
    TrainConfig,
    TrainStep,
    classifier_loss,
    default_dtype,
    lm_loss,
    param_dtype,
)

MLP_SPEC = MLPSpec((256, 1024, 1024, 256))
CNN_SPEC = CNNSpec()
WORKLOADS = (*REFERENCE_WORKLOADS, *PRESETS)


@dataclass(frozen=True)
class MemoryCase:
    """One training configuration of one workload."""

    workload: str
    batch: int
    config: TrainConfig
    seq_len: int = 0  # transformers only
    spec: ModelSpec | None = None  # a transformer spec not among the presets (read from a config.json)
    mlp: MLPSpec = MLP_SPEC  # the shapes of the mlp workload
    cnn: CNNSpec = CNN_SPEC  # the shapes of the cnn workload
    hf_config: str | None = None  # a config.json: the case is Hugging Face's model of it (workloads.hf), not ours

    def to_record(self, kind: str = "train") -> dict[str, Any]:
        """The case as plain JSON data: what a benchmark or a GPU run records beside its measurement, so that
        :meth:`from_record` rebuilds it and a CPU replays it against today's prediction."""
        c = self.config
        out: dict[str, Any] = {
            "kind": kind, "workload": self.workload, "batch": self.batch, "seq_len": self.seq_len,
            "precision": c.precision, "optimizer": c.optimizer, "optimizer_impl": c.optimizer_impl,
            "checkpointing": c.checkpointing, "grad_accum": c.grad_accum, "clip_grad_norm": c.clip_grad_norm,
        }
        if self.workload == "mlp":
            out["mlp"] = list(self.mlp.dims)
        elif self.workload == "cnn":
            out["cnn"] = {"in_channels": self.cnn.in_channels, "channels": list(self.cnn.channels),
                          "image_size": self.cnn.image_size, "n_classes": self.cnn.n_classes}
        elif self.spec is not None:
            out["spec"] = {k: v for k, v in asdict(self.spec).items() if v is not None}
        if self.hf_config is not None:
            out["hf_config"] = self.hf_config
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MemoryCase:
        """The case :meth:`to_record` wrote; ValueError naming the field when the record is not one."""
        try:
            config = TrainConfig(record["precision"], record["optimizer"], record["optimizer_impl"],
                                 record["checkpointing"], int(record["grad_accum"]), record.get("clip_grad_norm"))
            extra: dict[str, Any] = {}
            if "mlp" in record:
                extra["mlp"] = MLPSpec(tuple(record["mlp"]))
            if "cnn" in record:
                cnn = dict(record["cnn"])
                extra["cnn"] = CNNSpec(cnn["in_channels"], tuple(cnn["channels"]), cnn["image_size"],
                                       cnn["n_classes"])
            if "spec" in record:
                extra["spec"] = ModelSpec(**record["spec"])
            if record.get("hf_config") is not None:
                extra["hf_config"] = str(record["hf_config"])
            return cls(record["workload"], int(record["batch"]), config, seq_len=int(record.get("seq_len") or 0),
                       **extra)
        except KeyError as exc:
            raise ValueError(f"memory case record {record!r} lacks {exc}") from None
        except TypeError as exc:
            raise ValueError(f"memory case record {record!r}: {exc}") from None

    def transformer_spec(self) -> ModelSpec:
        return self.spec if self.spec is not None else get_preset(self.workload)

    def predict(self, device: str = "cpu", routing: Sequence[Sequence[int]] | None = None) -> TrainPeak:
        """The predicted step on ``device`` (``cpu``, ``cuda``, ``simulated``: the terms of
        :mod:`torchledger.formulas.device` it includes); a Mixture of Experts with ``routing``, the rows each
        expert of each block received (:attr:`MemoryMeasurement.routing`), else routed as if balanced."""
        c = self.config
        common = {"recipe": c.precision, "optimizer": c.optimizer, "grad_accum": c.grad_accum,
                  "optimizer_impl": c.optimizer_impl, "clip": c.clip_grad_norm is not None, "device": device}
        if self.workload == "mlp":
            return mlp_train_peak_bytes(self.mlp, self.batch, **common)  # type: ignore[arg-type]
        if self.workload == "cnn":
            return cnn_train_peak_bytes(self.cnn, self.batch, **common)  # type: ignore[arg-type]
        profile = hf_profile_or_none(self.hf_config) if self.hf_config is not None else None
        if profile is not None:  # what transformers runs: the implementation profile of its model_type
            return hf_train_peak_bytes(self.transformer_spec(), profile, self.batch, self.seq_len,
                                       checkpointing=c.checkpointing, **common)  # type: ignore[arg-type]
        return train_peak_bytes(self.transformer_spec(), self.batch, self.seq_len, checkpointing=c.checkpointing,
                                routing=routing, **common)  # type: ignore[arg-type]

    def build(self, device: str, *, fake: bool = False) -> tuple[nn.Module, TrainStep, list[tuple[Tensor, ...]]]:
        """The model, its training step and the step's micro-batches, on ``device``; ``fake=True`` (under a
        ``FakeTensorMode``): a Hugging Face model is built on the meta device and copied to fake tensors."""
        if self.workload not in WORKLOADS and self.spec is None:
            raise ValueError(f"workload={self.workload!r} is not one of {', '.join(WORKLOADS)}")
        torch.manual_seed(0)
        dtype = param_dtype(self.config.precision)
        gen = torch.Generator().manual_seed(0)
        with default_dtype(dtype):
            model, loss_fn, batches = self._model_and_batches(device, dtype, gen, fake)
        return model, TrainStep(model, self.config, loss_fn), batches

    def _model_and_batches(
        self, device: str, dtype: torch.dtype, gen: torch.Generator, fake: bool = False
    ) -> tuple[nn.Module, Callable[..., tuple[Tensor, Tensor]], list[tuple[Tensor, ...]]]:
        model: nn.Module
        shape: tuple[int, ...]
        batches: list[tuple[Tensor, ...]]
        if self.workload in REFERENCE_WORKLOADS:
            if self.config.checkpointing != "none":
                raise ValueError(f"checkpointing={self.config.checkpointing!r}: the {self.workload} has no blocks")
            if self.workload == "mlp":
                model, loss_fn = MLP(self.mlp, device=device), classifier_loss
                shape, classes = (self.batch, self.mlp.dims[0]), self.mlp.dims[-1]
            else:
                model, loss_fn = CNN(self.cnn, device=device), classifier_loss
                shape = (self.batch, self.cnn.in_channels, self.cnn.image_size, self.cnn.image_size)
                classes = self.cnn.n_classes
            batches = [
                (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype),
                 torch.randint(0, classes, (self.batch,), generator=gen).to(device))
                for _ in range(self.config.grad_accum)
            ]
        else:
            spec = self.transformer_spec()
            if self.hf_config is not None:
                from torchledger.workloads.hf import build_hf_causal_lm

                model = build_hf_causal_lm(self.hf_config, device=device, dtype=dtype, fake=fake)
            else:
                model = build_transformer(spec, device=device)
            loss_fn = lm_loss
            batches = [token_batch(spec, self.batch, self.seq_len, device=device, seed=i)
                       for i in range(self.config.grad_accum)]
        return model, loss_fn, batches


Built = tuple[nn.Module, TrainStep, list[tuple[Tensor, ...]]]


def cuda_baseline(device: str) -> tuple[int, int]:
    """The library workspaces (:func:`cuda_warmup`) and the allocated bytes a CUDA measurement is taken above.

    Unreachable Python objects are collected first. A peak is read as the allocator's peak less this baseline, so
    memory held at the baseline and freed during the step would lower it: in a process that runs several cases (a
    test worker), tensors of an earlier case that only a reference cycle still holds are freed whenever the cyclic
    collector next runs, possibly inside a later case's measured step. Such cycles are common: the first optimizer a
    process builds imports ``torch._dynamo``, during which ``torch.fx.wrap`` keeps its own frame in a local
    (``currentframe = inspect.currentframe()``), so every calling frame, and with them the case's model, optimizer
    and batches, stays allocated until that collection (6,699,120 B for gpt-tiny 4 x 128 in 32-true with AdamW,
    measured on the CPU)."""
    gc.collect()
    workspaces = cuda_warmup(device)
    return workspaces, cuda_allocated(device)


def measure_built(build: Callable[[], Built], device: str, *, snapshot: str | Path | None = None
                  ) -> MemoryMeasurement:
    """The steady-state step of what ``build()`` makes (the model, its step, the step's micro-batches): warm-up
    steps create the optimizer state (:meth:`TrainStep.warm_up`: one, or more where GradScaler skips the first), the
    next is measured. On CUDA the baseline is taken after the cuBLAS
    workspaces and before ``build()``, so the model states count and the batches are left out; elsewhere
    (``cpu``, or ``simulated`` under a FakeTensorMode the caller entered) the storage tracker measures."""
    if device.startswith("cuda"):
        workspaces, base = cuda_baseline(device)
        model, step, batches = build()
        step.warm_up(batches)  # optimizer state
        measured = measure_cuda(lambda: step.step(batches), base=base, device=device, model=model,
                                optimizer=step.optimizer, inputs=[t for b in batches for t in b],
                                library_workspaces=workspaces, snapshot=snapshot)
    else:
        model, step, batches = build()
        step.warm_up(batches)
        measured = measure_cpu(lambda: step.step(batches), model, step.optimizer, device=device, snapshot=snapshot)
    measured.routing = moe_routing(model)
    return measured


def moe_routing(model: nn.Module) -> list[list[int]] | None:
    """The rows each expert of each Mixture-of-Experts block of the reference transformer received in its last
    forward (:attr:`torchledger.workloads.models.MoE.tokens_per_expert`); None for a model without one."""
    return [list(m.tokens_per_expert) for m in model.modules() if isinstance(m, MoE)] or None


def check_simulable(precision: str) -> None:
    """ValueError for a recipe the simulation cannot run: GradScaler (``16-mixed``) reads its found-inf flag."""
    if precision == "16-mixed":
        raise ValueError("precision='16-mixed' cannot be simulated: GradScaler reads a value (found_inf.item())")


def measure(case: MemoryCase, device: str, *, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """Measure the steady-state step of ``case`` on ``device`` (``cpu``, ``cuda``); with ``snapshot``, also write
    the step's memory history there (:mod:`torchledger.measuring.snapshot`)."""
    return measure_built(lambda: case.build(device), device, snapshot=snapshot)


def predict_inference(case: MemoryCase, routing: Sequence[Sequence[int]] | None = None) -> InferencePeak:
    """The prefill peak of a transformer case (batch x seq_len prompt) in the case's ``*-true`` recipe; a Mixture of
    Experts with ``routing`` as :meth:`MemoryCase.predict` takes it."""
    if case.workload in REFERENCE_WORKLOADS:
        raise ValueError(f"workload={case.workload!r}: inference with a KV cache needs a transformer")
    return inference_peak_bytes(case.transformer_spec(), case.batch, case.seq_len, recipe=case.config.precision,
                                routing=routing)


def _inference_run(case: MemoryCase, device: str) -> tuple[nn.Module, Callable[[], object], StorageTracker,
                                                             Tensor]:
    """The model, a prefill that fills a fresh KV cache on each call, and a tracker that files that cache under
    ``kv_cache``; the prompt's token ids (the caller's)."""
    predict_inference(case)  # validates the workload and recipe
    spec = case.transformer_spec()
    dtype = param_dtype(case.config.precision)
    with default_dtype(dtype):
        model = build_transformer(spec, device=device)
    idx, _ = token_batch(spec, case.batch, case.seq_len, device=device)
    prefill = model.prefill
    cache: list[tuple[Tensor, Tensor]] = []
    tracker = StorageTracker().add_category("kv_cache", lambda: [t for kv in cache for t in kv])

    def run() -> object:
        cache.clear()
        with torch.no_grad():
            return prefill(idx, cache)

    return model, run, tracker, idx


def measure_inference(case: MemoryCase, device: str, *, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """Measure the prefill of ``case`` (a KV cache for every block) on ``device``."""
    if device.startswith("cuda"):
        workspaces, base = cuda_baseline(device)
        model, run, tracker, idx = _inference_run(case, device)
        run()  # kernels' one-time allocations
        measured = measure_cuda(run, base=base, device=device, model=model, tracker=tracker, inputs=[idx],
                                library_workspaces=workspaces, snapshot=snapshot)
    else:
        model, run, tracker, _ = _inference_run(case, device)
        measured = measure_cpu(run, model, device=device, tracker=tracker, snapshot=snapshot)
    measured.routing = moe_routing(model)
    return measured


def simulate_inference(case: MemoryCase, *, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """:func:`measure_inference` under ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model, run, tracker, _ = _inference_run(case, "cpu")
        return measure_cpu(run, model, device="simulated", tracker=tracker, snapshot=snapshot)


def simulate(case: MemoryCase, *, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """The same measurement under ``FakeTensorMode``: shapes only, nothing allocated, any size.

    NB: ``16-mixed`` cannot be simulated: GradScaler reads its found-inf flag with ``.item()``.
    """
    check_simulable(case.config.precision)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return measure_built(lambda: case.build("cpu", fake=True), "simulated", snapshot=snapshot)


def relative_error(predicted: int, measured: int) -> float:
    """|predicted - measured| / measured."""
    return abs(predicted - measured) / measured



def device_record(device: str) -> dict[str, Any]:
    """What a memory record says of the device it was measured on: its name, and on CUDA the compute capability and
    the torch and CUDA versions (the terms of :mod:`torchledger.formulas.device` depend on them)."""
    out: dict[str, Any] = {"name": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        out.update(name=torch.cuda.get_device_name(index),
                   compute_capability=list(torch.cuda.get_device_capability(index)), cuda=torch.version.cuda)
    return out
