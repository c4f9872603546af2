"""OpenVINO experts: the Predictor's networks run by OpenVINO on the CPU (the ``openvino`` extra).

Each network the Predictor uses (an expert of a checkpoint, an export's merged expert, a teacher or an
official SAT file) is converted once with ``openvino.convert_model`` from the same computation
:class:`~lorkd.inference.sliding_window.WindowModel` runs in torch (encoder through the chosen expert,
the full-resolution head alone, sigmoid), as one function of two inputs::

    image          float32 (batch, 1, X, Y, Z)   X, Y, Z fixed: the window (the decoder's positional encoding)
    queries        float32 (labels, query_dim)
    probabilities  float32 (batch, labels, X, Y, Z)

The converted model (OpenVINO IR, float32 weights) is cached on disk under
``<cache_dir>/openvino/<key>/``; the key hashes the identity of the checkpoint bytes loaded
(``LoadedModel.identity``; a model without one: its weights), which network of it, the network's
structure, the window and the OpenVINO, torch and converter versions, so a changed checkpoint is never
served stale. It is compiled for the CPU with an explicit precision (``f32`` by default: OpenVINO's own
default is bf16 on CPUs with AMX or AVX-512 BF16) and thread count.

``int8``: the converted model is quantised once by NNCF's post-training quantisation, calibrated on
windows of cases the user gives (:class:`Calibration`), and cached under a key of its own that adds the
calibration cases' identity; layers NNCF leaves unquantised run in f32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd.inference.sliding_window import WindowModel
from lorkd.io import publish_folder

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "int8")
CONVERTER_VERSION = 1  # bump when the converted graph changes for the same network
_OV_PRECISION = {"f32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the layers NNCF left in float run in f32
INSTALL = 'pip install -e ".[openvino]"'
# (window (1, 1, X, Y, Z), queries (labels, query_dim)) float32 arrays: one input of the converted model
Sample = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Calibration:
    """What an int8 network is calibrated on: ``identity`` (JSON-able; the cases, e.g. their files' identity
    and labels) keys the cache; ``samples()`` returns the model inputs, computed only when quantising."""

    identity: Mapping[str, Any]
    samples: Callable[[], list[Sample]]


def available() -> bool:
    """Whether OpenVINO is installed (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def default_cache_dir() -> Path:
    """``$LORKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorkd``, else ``~/.cache/lorkd``."""
    if os.environ.get("LORKD_CACHE_DIR"):
        return Path(os.environ["LORKD_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorkd"


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f"inference.runtime=openvino needs the openvino extra: {INSTALL}") from None
    return ov.Core()


def cpu_description() -> dict[str, Any]:
    """The CPU as OpenVINO sees it: its name and optimisation capabilities (``BF16``: native bf16)."""
    core = _core()
    return {
        "name": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }


def check_precision(precision: str) -> None:
    """``precision`` is one of :data:`PRECISIONS` and this CPU runs it natively (ValueError otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and importlib.util.find_spec("nncf") is None:
        raise ImportError(f"precision=int8 quantises with NNCF, which is not installed: {INSTALL}")
    if precision == "bf16":
        cpu = cpu_description()
        if "BF16" not in cpu["capabilities"]:
            raise ValueError(
                f"precision=bf16 needs a CPU with native bf16 (AMX or AVX-512 BF16); OpenVINO reports "
                f"{cpu['name']} with {', '.join(cpu['capabilities'])}: use precision=f32"
            )


class _Probabilities(torch.nn.Module):
    """What :class:`WindowModel` computes for one network and expert, as a function of (image, queries)."""

    def __init__(self, net: torch.nn.Module, expert: int | None) -> None:
        super().__init__()
        self.net = net
        self.expert = expert

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return WindowModel(self.net, queries, self.expert, max_queries=2**31)(image)


def network_digest(net: torch.nn.Module, weights: bool = False) -> str:
    """sha256 of a network's structure (modules, parameter names, shapes, dtypes) and, with ``weights``, its values."""
    digest = hashlib.sha256(repr(net).encode())
    for name, tensor in net.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if weights:
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _folder_name(fields: Mapping[str, Any]) -> str:
    """A cache folder name: the sha256 prefix of ``fields`` as canonical JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_key(
    identity: Mapping[str, Any], network: str, net: torch.nn.Module, expert: int | None, window: Sequence[int]
) -> str:
    """The cache folder name of a converted network (see the module docstring). ``identity``: the loaded
    model's (the bytes loaded, with its source and fingerprint); empty: the network's weights are hashed."""
    import openvino as ov

    fields = {
        "identity": dict(identity),
        "network": network,
        "expert": expert,
        "structure": network_digest(net, weights=not identity),
        "window": [int(w) for w in window],
        "openvino": ov.get_version(),
        "torch": torch.__version__,
        "converter": CONVERTER_VERSION,
    }
    return _folder_name(fields)


def convert_network(net: torch.nn.Module, expert: int | None, window: Sequence[int]) -> Any:
    """``net`` (routed through ``expert``) as an ``openvino.Model`` with a dynamic batch and label count."""
    import openvino as ov

    query_dim = int(net.query_dim)
    window = [int(w) for w in window]
    example = (torch.zeros(1, 1, *window), torch.zeros(2, query_dim))  # one window: the least memory
    module = _Probabilities(net.to("cpu").eval(), expert)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for one window
        module(*example)  # an expert's merged weights (W0 + dW) are computed now: constants in every trace
        return ov.convert_model(
            module, example_input=example,
            input=[("image", [-1, 1, *window]), ("queries", [-1, query_dim])],
        )  # fmt: skip


def _save(model: Any, xml: Path) -> None:
    """Save ``model`` as ``xml`` (and its .bin) through a staging folder beside it: never half written."""
    import openvino as ov

    xml.parent.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=xml.parent.parent))
    try:
        ov.save_model(model, str(stage / xml.name), compress_to_fp16=False)
        publish_folder(stage, xml.parent, keep=lambda folder: (folder / "model.xml").is_file())
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def cached_model(
    net: torch.nn.Module, expert: int | None, window: Sequence[int], key: str, cache_dir: str | Path
) -> Path:
    """The IR file of the converted network under ``cache_dir/openvino/key``, converting it first if absent."""
    xml = Path(cache_dir) / "openvino" / key / "model.xml"
    if not xml.is_file():
        log.info("converting a network for OpenVINO (window %s), once: cached in %s", "x".join(map(str, window)), xml.parent)
        _save(convert_network(net, expert, window), xml)
    return xml


def quantized_key(key: str, calibration: Calibration) -> str:
    """The cache folder name of the int8 model of the converted network ``key`` calibrated on ``calibration``."""
    import nncf

    fields = {"model": key, "precision": "int8", "calibration": dict(calibration.identity), "nncf": nncf.__version__}
    return _folder_name(fields)


def quantized_model(xml: Path, key: str, calibration: Calibration, cache_dir: str | Path) -> Path:
    """The IR file of the converted network ``xml`` quantised to int8 by NNCF on ``calibration``'s samples,
    under ``cache_dir/openvino/<quantized_key>``, quantising it first if absent."""
    import nncf

    out = Path(cache_dir) / "openvino" / quantized_key(key, calibration) / "model.xml"
    if out.is_file():
        return out
    samples = calibration.samples()
    if not samples:
        raise ValueError("precision=int8: no calibration window for this network (no calibration case has its labels)")
    log.info("quantising a network to int8 on %d calibration windows, once: cached in %s", len(samples), out.parent)
    model = nncf.quantize(_core().read_model(str(xml)), nncf.Dataset(samples), subset_size=len(samples))
    _save(model, out)
    return out


class OpenVinoExpert(torch.nn.Module):
    """A network compiled by OpenVINO; ``probabilities(windows, queries)`` as :class:`WindowModel` computes.

    A module only so that the Predictor can hold it where it holds networks; it has no parameters.
    """

    def __init__(self, xml: str | Path, window: Sequence[int], threads: int, precision: str = "f32") -> None:
        super().__init__()
        check_precision(precision)
        core = _core()
        config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "INFERENCE_NUM_THREADS": int(threads)}
        self.path = str(xml)
        self.window = tuple(int(w) for w in window)
        self.precision = precision
        self._core, self._config = core, config
        self.compiled = core.compile_model(self.path, "CPU", config)  # dynamic until the first call
        self.request = self.compiled.create_infer_request()
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (image, queries) compiled for

    def _compile_for(self, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        """Compile the model for these (image, queries) shapes, replacing the one compiled before: static shapes
        let OpenVINO share its buffers better (0.9 GB less for the Nano student at 288x288x96; 0.3 s to compile)."""
        model = self._core.read_model(self.path)
        model.reshape({"image": list(shapes[0]), "queries": list(shapes[1])})
        self.compiled = self.request = None  # the previous model and its buffers go first
        self.compiled = self._core.compile_model(model, "CPU", self._config)
        self.request = self.compiled.create_infer_request()
        self.shapes = shapes

    def probabilities(self, windows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(B, N, *window) probabilities on the CPU. The result is the request's output buffer, not a copy
        (0.76 GB for 24 labels at 288x288x96, and a second one in OpenVINO's own copy to numpy): it is valid,
        and writable, until the next call, which overwrites it (copy it to keep it longer)."""
        if tuple(windows.shape[2:]) != self.window:
            raise ValueError(f"{self.path} runs windows of {self.window}, got {tuple(windows.shape[2:])}")
        feeds = [
            np.ascontiguousarray(windows.detach().float().cpu().numpy()),
            np.ascontiguousarray(queries.detach().float().cpu().numpy()),
        ]
        shapes = (feeds[0].shape, feeds[1].shape)
        if shapes != self.shapes:
            self._compile_for(shapes)
        return torch.from_numpy(self.request.infer(feeds, share_inputs=True, share_outputs=True)[0]).to(windows.device)

    def release_memory(self) -> None:
        """Free OpenVINO's intermediate buffers, which it keeps between calls (about 5 GB for the Nano student
        at 288x288x96): 0.4 s, and the next call allocates them again. Call it after the last window of a volume."""
        self.compiled.release_memory()


def openvino_expert(
    net: torch.nn.Module,
    expert: int | None,
    window: Sequence[int],
    identity: Mapping[str, Any],
    network: str,
    threads: int,
    precision: str = "f32",
    cache_dir: str | Path | None = None,
    calibration: Calibration | None = None,
) -> OpenVinoExpert:
    """``net`` (through ``expert``) compiled by OpenVINO, converted once and cached (see the module docstring);
    ``precision="int8"`` needs ``calibration``."""
    check_precision(precision)
    if precision == "int8" and calibration is None:
        raise ValueError("precision=int8 needs calibration cases (inference.calibration=<manifest .jsonl>)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(identity, network, net, expert, window)

    def model_file() -> Path:
        xml = cached_model(net, expert, window, key, cache)
        return quantized_model(xml, key, calibration, cache) if calibration is not None and precision == "int8" else xml

    xml = model_file()
    try:
        return OpenVinoExpert(xml, window, threads, precision)
    except RuntimeError:  # an unreadable cache entry (a disk fault, a tampered file): convert again, once
        log.warning("the cached OpenVINO model %s could not be compiled: converting again", xml.parent)
        shutil.rmtree(xml.parent, ignore_errors=True)
        shutil.rmtree(cache / "openvino" / key, ignore_errors=True)
        return OpenVinoExpert(model_file(), window, threads, precision)
