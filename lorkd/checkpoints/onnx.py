"""ONNX experts: each merged expert of an export as one ONNX graph, run with onnxruntime (the ``onnx`` extra).

``lorkd-export ... onnx=true`` writes ``<region>/model.onnx``: the whole network (backbone, query
decoder and mask head) with the prompt queries as an input::

    image          float32 (batch, 1, X, Y, Z)   one sliding window per batch item; X, Y, Z fixed (the window)
    queries        float32 (labels, query_dim)   ``PromptBank.queries(labels, modality)``
    probabilities  float32 (batch, labels, X, Y, Z)   sigmoid of the logits

The window is fixed at export time (the training patch size, as the Predictor's default), because the
query decoder's positional encoding is computed for one latent grid; batch and labels are dynamic.
The graph comes from ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: no
onnxscript needed), opset 18; ``index.json`` records the window, opset and each file's sha256.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd.models.sat import SAT

ONNX_MODEL = "model.onnx"
OPSET = 18
INPUTS = ("image", "queries")
OUTPUT = "probabilities"


class ProbabilityNet(torch.nn.Module):
    """``SAT`` as one function (image windows, queries) -> probabilities, the graph that is exported."""

    def __init__(self, net: SAT) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        features = self.net.encode(image)
        return torch.sigmoid(self.net.decode(features, queries)[0])


def export_onnx(net: SAT, window: Sequence[int], path: str | Path) -> Path:
    """Write ``net`` (eval mode, CPU) as an ONNX graph for windows of size ``window`` at ``path``."""
    import warnings

    net = net.to("cpu").eval()
    image = torch.zeros(2, 1, *(int(w) for w in window))
    queries = torch.zeros(3, net.query_dim)
    dynamic = {"image": {0: "batch"}, "queries": {0: "labels"}, OUTPUT: {0: "batch", 1: "labels"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for one window
        torch.onnx.export(
            ProbabilityNet(net), (image, queries), str(path), input_names=list(INPUTS), output_names=[OUTPUT],
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    return Path(path)


class OnnxExpert(torch.nn.Module):
    """An exported expert run by onnxruntime; ``probabilities(windows, queries)`` as :class:`ProbabilityNet`.

    A module only so that the Predictor can hold it where it holds networks; it has no parameters.
    """

    def __init__(self, path: str | Path, window: Sequence[int], threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f'running {path} needs the onnx extra: pip install -e ".[onnx]"') from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.path = str(path)
        self.window = tuple(int(w) for w in window)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def probabilities(self, windows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        if tuple(windows.shape[2:]) != self.window:
            raise ValueError(f"{self.path} runs windows of {self.window}, got {tuple(windows.shape[2:])}")
        feeds = {
            "image": np.ascontiguousarray(windows.detach().float().cpu().numpy()),
            "queries": np.ascontiguousarray(queries.detach().float().cpu().numpy()),
        }
        (out,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(out).to(windows.device)


def onnx_entry(path: Path, window: Sequence[int]) -> dict[str, Any]:
    """What ``index.json`` records of one ONNX file."""
    from lorkd.io import sha256_file

    return {"file": path.name, "sha256": sha256_file(path), "window": [int(w) for w in window], "opset": OPSET}
