"""Peak device memory of one training step, counted without a device.

The real networks of an experiment are built on the meta device (no memory), and one real training
step runs on meta tensors: the LightningModule's ``training_step`` (teacher forward, student forward,
losses), ``backward`` and the optimizer's step. A dispatch mode sees every tensor each op allocates and,
through weak references on the storages, every one that is freed, so the live bytes, their peak and
what autograd saves (``saved_tensors_hooks``, unique storages) are counted exactly, op by op.

Autocast has no meta backend, so ``bf16-mixed``/``16-mixed`` are emulated above autograd with CUDA's
casting rules (:class:`MetaAutocast`): the ops CUDA autocast runs in half precision (convolutions,
linear, matmul, einsum, attention) get half-precision inputs (a parameter is cast once per step and
the cast is cached, as autocast does), the float32 ones (norms of the layer/group kind, softmax,
losses) get float32 inputs, and the others run on what they are given. Not counted: cuDNN's workspace
and the caching allocator's rounding and fragmentation; :data:`CUDA_OVERHEAD` covers them, as
calibrated against the H100 (``scripts/benchmarks/memory.py --calibrate``).

    cfg = experiment_config("pro")                          # configs/train.yaml with experiment=pro
    estimate = training_step_memory(cfg)                     # a MemoryEstimate (bytes), at the shipped batch
    estimate.peak_gib, estimate.table()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
BUDGET_GIB = 72.0  # what a step may take of an 80 GB card (A100/H100): the rest for the CUDA context, cuDNN and fragmentation
# cuDNN workspace, allocator rounding and fragmentation on top of the counted peak (calibrated: RESULTS.md "memory.py")
CUDA_OVERHEAD = 1.0

HALF_OPS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    F.scaled_dot_product_attention, torch.einsum, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm, F.prelu,
}  # fmt: skip
FLOAT_OPS = {
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
    torch.Tensor.log_softmax, F.binary_cross_entropy_with_logits, F.mse_loss, F.kl_div, F.l1_loss,
    F.smooth_l1_loss, F.cross_entropy, F.nll_loss, torch.exp, torch.log, torch.Tensor.exp, torch.Tensor.log,
    torch.pow, torch.Tensor.pow, torch.rsqrt, torch.cdist, F.softplus,
}  # fmt: skip
# cuDNN's workspace while a 3D convolution runs, in units of the bytes of its input plus its output
# (forward; backward: the output gradient plus the input): calibrated on the H100 no-grad teacher forwards
CONV_WORKSPACE = 1.4
CONV_OPS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for meta tensors (see the module docstring); ``torch.is_autocast_enabled()``
    is True inside, as code that asks (e.g. the routed experts) would see it on the GPU."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}
        self._saved: tuple[bool, torch.dtype] | None = None

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad and torch.is_grad_enabled() and dtype == self.dtype:
            if id(value) not in self._cache:  # autocast caches the casts of parameters within its region
                self._cache[id(value)] = value.to(dtype)
            return self._cache[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in HALF_OPS else torch.float32 if func in FLOAT_OPS else None
        if dtype is not None and not kwargs.get("dtype"):
            args = [[self._cast(v, dtype) for v in a] if isinstance(a, (list, tuple)) else self._cast(a, dtype) for a in args]
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __enter__(self):
        self._saved = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        torch._C.set_autocast_enabled("cuda", True)
        torch._C.set_autocast_dtype("cuda", self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        assert self._saved is not None
        torch._C.set_autocast_enabled("cuda", self._saved[0])
        torch._C.set_autocast_dtype("cuda", self._saved[1])
        self._cache.clear()
        return super().__exit__(*exc)


class LiveMemory(TorchDispatchMode):
    """Live bytes of tensor storages, op by op (forward and backward), and their peak; :meth:`phase` names
    the part of the step that runs, :attr:`peak_phase` says in which the peak fell."""

    def __init__(self, workspace: float | None = None) -> None:
        super().__init__()
        self.workspace = CONV_WORKSPACE if workspace is None else workspace
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase_name = "start"
        self.peak_phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.saved: dict[str, dict[int, int]] = {}  # phase -> {storage: bytes} saved by autograd
        self.excluded: set[int] = set()  # storages not counted as saved activations (parameters)

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase_name
        self.phase_peaks[self.phase_name] = max(self.phase_peaks.get(self.phase_name, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def phase(self, name: str) -> int:
        """Start phase ``name``; returns the live bytes now."""
        self.phase_name = name
        self.phase_peaks[name] = self.current
        return self.current

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key not in self.excluded:
            self.saved.setdefault(self.phase_name, {})[key] = tensor.untyped_storage().nbytes()
        return tensor

    def saved_bytes(self, phase: str) -> int:
        return sum(self.saved.get(phase, {}).values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.track(value)
        if func in CONV_OPS and self.workspace:
            workspace = int(self.workspace * (_nbytes(args[0]) + _nbytes(args[1] if func is CONV_OPS[1] else out)))
            if self.current + workspace > self.peak:
                self.peak, self.peak_phase = self.current + workspace, self.phase_name
            self.phase_peaks[self.phase_name] = max(self.phase_peaks.get(self.phase_name, 0), self.current + workspace)
        return out

    @contextmanager
    def counting(self, precision: str = "32-true") -> Iterator[LiveMemory]:
        """Count within the block, with ``precision``'s autocast emulated; saved tensors are recorded."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not modelled; expected one of {sorted(PRECISIONS)}")
        with ExitStack() as stack:
            if PRECISIONS[precision] is not None:
                stack.enter_context(MetaAutocast(PRECISIONS[precision]))
                stack.enter_context(_recompute_with_autocast(PRECISIONS[precision]))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
            stack.enter_context(self)
            yield self


@contextmanager
def _recompute_with_autocast(dtype: torch.dtype) -> Iterator[None]:
    """Activation-checkpointed stages (:func:`lorkd.models.unet.recomputed`) recompute under the emulated
    autocast too: torch.utils.checkpoint restores a real device's autocast itself, but the recomputation
    runs in backward, where the function mode of the forward is not active."""
    from lorkd.models import unet

    plain = unet.checkpoint

    def checkpoint(fn: Callable[..., Any], *args: Any, context_fn: Callable[[], tuple[Any, Any]], **kwargs: Any) -> Any:
        def contexts() -> tuple[Any, Any]:
            forward, recompute = context_fn()

            @contextmanager
            def both() -> Iterator[None]:
                with recompute, MetaAutocast(dtype):
                    yield

            return forward, both()

        return plain(fn, *args, context_fn=contexts, **kwargs)

    unet.checkpoint = checkpoint
    try:
        yield
    finally:
        unet.checkpoint = plain


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step on one device (see :func:`training_step_memory`)."""

    parameters: int  # every weight on the device (student, teacher, text head)
    gradients: int  # of the trainable parameters
    optimizer: int  # optimizer states (AdamW: two float32 tensors per trainable parameter)
    batch: int  # the micro-batch's tensors (image, masks, queries)
    teacher_forward: int  # the frozen teacher's no-grad forward: its peak above what was live before it
    activations: int  # what autograd saved in the forward (unique storages, parameters excluded)
    logits_loss: int  # forward outputs and loss buffers still live when backward starts, beyond activations
    backward: int  # the backward's peak above what was live when it started
    counted_peak: int  # the highest live bytes counted over the step (optimizer step included)
    peak_phase: str  # where it fell
    overhead: float = CUDA_OVERHEAD
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # micro_batch, accumulate, checkpointing, ...

    @property
    def peak(self) -> int:
        """The device's peak: the counted peak times the calibrated CUDA overhead."""
        return int(self.counted_peak * self.overhead)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def gib(self) -> dict[str, float]:
        """Every byte field in GiB, and ``peak``."""
        out = {f.name: getattr(self, f.name) / GIB for f in fields(self) if isinstance(getattr(self, f.name), int)}
        return {**out, "peak": self.peak_gib}

    def table(self) -> str:
        """A markdown table of the breakdown (GiB)."""
        rows = [f"| {name.replace('_', ' ')} | {value:.2f} |" for name, value in self.gib().items()]
        return "\n".join(["| part | GiB |", "|---|---|", *rows, f"| peak falls in | {self.peak_phase} |"])


# ---- building an experiment on the meta device ---------------------------------------------------------


def experiment_config(experiment: str, overrides: Sequence[str] = ()) -> Any:
    """``configs/train.yaml`` composed with ``experiment=<experiment>`` and ``overrides`` (Hydra's compose API);
    the paths an experiment leaves to the user (teacher file, language model) get placeholders."""
    from hydra import compose, initialize_config_dir

    from lorkd.utils import CONFIG_DIR, register_resolvers

    register_resolvers()
    placeholders = ["teacher.checkpoint=/unused/teacher.pth", "text_encoder.language_model_path=/unused/lm"]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = [p for p in placeholders if p.split("=", 1)[0] not in given]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", *extra, *overrides])


def _text_encoder(cfg: Any) -> nn.Module:
    from lorkd.models.text import TextEncoder

    text = cfg.text_encoder
    hidden = int(text.get("hidden_dim", text.query_dim))  # the language model stays on the CPU; only its head is here
    return TextEncoder(hidden_dim=hidden, query_dim=int(text.query_dim), proj_hidden=int(text.proj_hidden))


def _teacher_net(cfg: Any) -> nn.Module:
    """The frozen teacher's architecture: ``teacher.backbone`` (a configs/backbone preset) as SAT trains it."""
    from omegaconf import OmegaConf

    from lorkd.models.sat import SAT
    from lorkd.utils import CONFIG_DIR

    name = cfg.teacher.get("backbone")
    if not name:
        raise ValueError("the config has no teacher.backbone (the teacher's backbone preset, for the memory model)")
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "backbone" / f"{name}.yaml"))
    student = OmegaConf.to_container(cfg.model.student, resolve=True)
    decoder = {k: student[k] for k in ("query_dim", "decoder_layers", "decoder_heads", "decoder_ffn", "dropout")}
    overrides = OmegaConf.to_container(cfg.teacher.net_overrides, resolve=True) or {}
    return SAT(**{**spec, **decoder, "deep_supervision": True, **overrides})


def build_module(cfg: Any) -> Any:
    """The experiment's LightningModule with its real-size networks on the meta device (no memory used);
    prompts come from the batch (``batch["queries"]``) and logging is off."""
    from hydra.utils import instantiate

    from lorkd.checkpoints.loading import LoadedModel
    from lorkd.prompts import PromptBank

    target = cfg.model._target_
    with torch.device("meta"):
        text = _text_encoder(cfg)
        regions = instantiate(cfg.regions)
        optimizer = instantiate(cfg.model.optimizer)
        if target.endswith("LoRKDModule"):
            from lorkd.modules.lorkd_module import LoRKDModule

            teacher = LoadedModel(net=_teacher_net(cfg), prompts=PromptBank(text), network="teacher", fingerprint="meta")
            m = cfg.model
            module = LoRKDModule(
                teacher=teacher, student=instantiate(m.student), experts=instantiate(m.experts), optimizer=optimizer,
                region_map=regions, lambda_kd=m.lambda_kd, temperature=m.temperature, kd_mode=m.kd_mode,
                feature_kd_weight=m.feature_kd_weight, mixed_batch=m.mixed_batch,
            )  # fmt: skip
        elif target.endswith("SATModule"):
            from lorkd.modules.sat_module import SATModule

            module = SATModule(net=instantiate(cfg.model.net), text_encoder=text, optimizer=optimizer, region_map=regions)
        else:
            raise ValueError(f"the memory model knows LoRKDModule and SATModule, not {target}")
    module.queries_for = lambda batch: batch["queries"]
    module.log = module.log_dict = lambda *args, **kwargs: None
    return module.train()


def meta_batch(batch_size: int, queries: int, patch: Sequence[int], query_dim: int, region: int = 0,
               mask_dtype: torch.dtype = torch.float32) -> dict[str, Any]:  # fmt: skip
    """A training batch as the device sees it, on the meta device (one region, every query valid)."""
    device = torch.device("meta")
    return {
        "image": torch.empty(batch_size, 1, *patch, device=device),
        "masks": torch.empty(batch_size, queries, *patch, device=device, dtype=mask_dtype),
        "query_mask": torch.ones(batch_size, queries, dtype=torch.bool, device=device),
        "region": torch.full((batch_size,), region, dtype=torch.long),  # routing reads its values: a host tensor
        "queries": torch.empty(batch_size, queries, query_dim, device=device),
        "labels": [["x"] * queries] * batch_size,
        "modality": ["ct"] * batch_size,
    }


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def largest_expert(cfg: Any, regions: Sequence[str]) -> int:
    """Index of the region with the highest expert rank (the largest routed step); 0 without experts."""
    ranks = cfg.model.get("experts", {}).get("ranks") if "experts" in cfg.model else None
    if not ranks:
        return 0
    return max(range(len(regions)), key=lambda i: int(ranks[regions[i]]))


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of every U-Net's stages in ``module`` (trained ones matter)."""
    from lorkd.models.unet import PlainConvUNet

    for m in module.modules():
        if isinstance(m, PlainConvUNet):
            m.checkpoint_stages = enabled


def training_step_memory(
    cfg: Any,
    micro_batch: int | None = None,
    checkpointing: bool | None = None,
    mask_dtype: torch.dtype = torch.float32,
    overhead: float = CUDA_OVERHEAD,
) -> MemoryEstimate:
    """Peak device memory of one training step of the composed experiment ``cfg`` (:func:`experiment_config`):
    ``micro_batch`` (default ``data.batch_size``) samples, ``trainer.accumulate_grad_batches`` (gradients
    stay on the device between micro-batches when > 1), ``trainer.precision``, activation checkpointing as
    configured (or ``checkpointing``), the optimizer of ``model.optimizer`` with its states already made."""
    module = build_module(cfg)
    if checkpointing is not None:
        set_activation_checkpointing(module, checkpointing)
    data = cfg.data
    micro = int(micro_batch if micro_batch is not None else data.batch_size)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    regions = list(cfg.regions.regions)
    query_dim = int(cfg.text_encoder.query_dim)
    batch = meta_batch(micro, int(data.max_queries), list(data.patch_size), query_dim, largest_expert(cfg, regions), mask_dtype)
    trainable = module.trainable_parameters()
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True  # what CUDA runs by default (one temporary as large as the parameters)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the states exist from the first step on
    if accumulate == 1:
        optimizer.zero_grad(set_to_none=True)
    params = list(module.parameters())
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in trainable if p.grad is not None]
    batch_tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_meta]
    tracker = LiveMemory()
    tracker.excluded = {p.untyped_storage()._cdata for p in params}
    for t in [*params, *states, *grads, *batch_tensors]:
        tracker.track(t)
    marks = _phase_marks(module, tracker)
    with tracker.counting(str(cfg.trainer.precision)):
        tracker.phase("training_step")
        loss = module.training_step(batch, 0)
        tracker.phase("backward")
        at_backward = tracker.current
        loss.backward()
        del loss
        tracker.phase("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=accumulate == 1)
    for handle in marks.handles:
        handle.remove()
    forward_saved = tracker.saved_bytes("forward")
    return MemoryEstimate(
        parameters=_bytes(params),
        gradients=_bytes(p for p in trainable),  # float32 like the parameters
        optimizer=_bytes(states),
        batch=_bytes(batch_tensors),
        teacher_forward=max(0, tracker.phase_peaks.get("teacher", 0) - marks.live.get("before_teacher", 0)),
        activations=forward_saved,
        logits_loss=max(0, at_backward - marks.live.get("before_forward", at_backward) - forward_saved),
        backward=max(0, tracker.phase_peaks.get("backward", 0) - at_backward),
        counted_peak=tracker.peak,
        peak_phase=tracker.peak_phase,
        overhead=overhead,
        meta={"micro_batch": micro, "accumulate": accumulate, "precision": str(cfg.trainer.precision),
              "checkpointing": _checkpointing(module)},
    )  # fmt: skip


def _checkpointing(module: nn.Module) -> bool:
    from lorkd.models.unet import PlainConvUNet

    return any(getattr(m, "checkpoint_stages", False) for m in module.modules() if isinstance(m, PlainConvUNet))


@dataclass
class _Marks:
    live: dict[str, int] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)


def _phase_marks(module: nn.Module, tracker: LiveMemory) -> _Marks:
    """Forward hooks naming the phases: the teacher's forward, the trained network's forward, the losses."""
    marks = _Marks()
    teacher = getattr(module, "teacher", None)
    trained = module.student if hasattr(module, "student") else module.net

    def mark(name: str, phase: str | None) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            marks.live[name] = tracker.current
            if phase is not None:
                tracker.phase(phase)

        return hook

    if teacher is not None:
        marks.handles += [teacher.register_forward_pre_hook(mark("before_teacher", "teacher")),
                          teacher.register_forward_hook(mark("after_teacher", "between"))]  # fmt: skip
    marks.handles += [trained.register_forward_pre_hook(mark("before_forward", "forward")),
                      trained.register_forward_hook(mark("after_forward", "loss"))]  # fmt: skip
    return marks
