"""OpenVINO runtime: the Predictor's networks converted once, cached by the bytes loaded, masks as torch's."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config

from lorkd.commands.predict import predict
from lorkd.inference import openvino_runtime
from lorkd.inference.openvino_runtime import OpenVinoExpert
from lorkd.inference.predictor import Predictor

pytest.importorskip("openvino")
REGIONS = ["abdomen", "thorax", "brain"]  # the demo test cases' experts
# f32 rounding differs between the runtimes (max |dp| about 1e-5 on the demo cases): only voxels this close to the
# threshold may take another side of it
TOLERANCE = 1e-4


@pytest.fixture
def conversions(monkeypatch) -> list[tuple]:
    """(expert, window) of every network converted to OpenVINO."""
    calls: list[tuple] = []
    real = openvino_runtime.convert_network

    def spy(net, expert, window):
        calls.append((expert, tuple(window)))
        return real(net, expert, window)

    monkeypatch.setattr(openvino_runtime, "convert_network", spy)
    return calls


def _demo_cases(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_masks(a, b, threshold: float) -> None:
    """Same labels, routes and geometry; probabilities within rounding; masks equal off the threshold's edge."""
    assert a.routes == b.routes and a.label_ids == b.label_ids
    for label in a.labels:
        for x, y in ((a.masks[label], b.masks[label]), (a.probabilities[label], b.probabilities[label])):
            assert x.shape == y.shape == a.image.shape and np.array_equal(x.affine, a.image.affine)
        p, q = np.asarray(a.probabilities[label].dataobj), np.asarray(b.probabilities[label].dataobj)
        np.testing.assert_allclose(p, q, atol=TOLERANCE)
        near = np.abs(p - threshold) < TOLERANCE
        mask_a, mask_b = np.asarray(a.masks[label].dataobj), np.asarray(b.masks[label].dataobj)
        assert np.array_equal(mask_a[~near], mask_b[~near]) and near.mean() < 0.01
    assert np.array_equal(a.segmentation.affine, b.segmentation.affine)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_openvino_f32_gives_torch_masks_on_the_demo_test_cases(source, distinct_lorkd_ckpt, tiny_export, tiny_demo_data, tmp_path):
    path = distinct_lorkd_ckpt if source == "checkpoint" else tiny_export
    options = dict(device="cpu", overlap=0.25, cache_dir=tmp_path)
    torch_predictor = Predictor.from_checkpoint(path, **options)
    ov_predictor = Predictor.from_checkpoint(path, runtime="openvino", **options)
    for case in _demo_cases(tiny_demo_data):
        image = tiny_demo_data / case["image"]
        a = torch_predictor.predict(image, case["label"], case["modality"], return_probabilities=True)
        b = ov_predictor.predict(image, case["label"], case["modality"], return_probabilities=True)
        assert set(a.routes.values()) <= set(REGIONS)
        _assert_same_masks(a, b, torch_predictor.threshold)
    compiled = [net for net, _ in ov_predictor._compiled.values()]
    assert compiled and all(isinstance(net, OpenVinoExpert) for net in compiled)
    assert {net.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() for net in compiled} == {"f32"}


def test_a_second_predictor_reuses_the_cache_and_a_rewritten_checkpoint_is_converted_again(
    distinct_lorkd_ckpt, tmp_path, conversions
):
    path = tmp_path / "lorkd.ckpt"
    shutil.copy(distinct_lorkd_ckpt, path)
    options = dict(device="cpu", runtime="openvino", cache_dir=tmp_path / "cache", threads=1)
    first = Predictor.from_checkpoint(path, **options)
    first.check(["liver"], "ct")
    assert len(conversions) == 1
    network = first._compiled[next(iter(first._compiled))][0]
    assert network.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert network.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"  # not bf16, AMX CPUs' default
    Predictor.from_checkpoint(path, **options).check(["liver", "spleen"], "ct")  # the same expert
    assert len(conversions) == 1
    # other bytes of the same size: one expert weight changed (stat identity moves on with the file's mtime)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k in raw["state_dict"] if ".lora_B." in k and "abdomen" in k)
    raw["state_dict"][key] = raw["state_dict"][key] + 1.0
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    torch.save(raw, path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert path.stat().st_size == size
    image = np.random.default_rng(0).normal(100, 40, (40, 30, 12)).astype(np.float32)
    rewritten = Predictor.from_checkpoint(path, **options)
    result = rewritten.predict(image, ["liver"], "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]), return_probabilities=True)
    assert len(conversions) == 2
    reference = Predictor.from_checkpoint(path, device="cpu").predict(
        image, ["liver"], "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]), return_probabilities=True
    )
    _assert_same_masks(reference, result, rewritten.threshold)


def test_auto_runs_openvino_on_the_cpu_and_torch_without_it_or_when_conversion_fails(
    tiny_lorkd_ckpt, tmp_path, monkeypatch, caplog
):
    auto = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="auto", cache_dir=tmp_path)
    group = auto.check(["liver"], "ct")[0]
    assert auto.cpu_runtime == "openvino" and isinstance(auto._network(group)[0], OpenVinoExpert)
    auto.device = torch.device("cuda")  # GPUs: torch (bf16 autocast), without looking for a GPU here
    assert auto._cpu_runtime() is None
    auto.runtime = "openvino"
    with pytest.raises(ValueError, match="runs on the CPU"):
        auto._cpu_runtime()
    net, expert = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu")._network(group)

    def broken(*args):
        raise RuntimeError("unsupported operation\nmore detail")

    monkeypatch.setattr(openvino_runtime, "convert_network", broken)
    with caplog.at_level(logging.WARNING):
        fallback = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="auto", cache_dir=tmp_path / "other")
        network, routed = fallback._network(group)
    assert type(network) is type(net) and routed == expert == group.expert
    assert "OpenVINO could not convert" in caplog.text and "unsupported operation" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported operation"):  # asked for by name: no fallback
        Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="openvino", cache_dir=tmp_path / "other")._network(group)
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        missing = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="auto")
    assert missing.cpu_runtime is None and "OpenVINO is not installed" in caplog.text
    assert type(missing._network(group)[0]) is type(net)
    with pytest.raises(ImportError, match="openvino extra"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="openvino")


def test_reduced_precision_is_explicit_and_needs_native_support(tiny_lorkd_ckpt, monkeypatch):
    with pytest.raises(ValueError, match="runtime=openvino"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", precision="bf16")  # torch: no such option
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="openvino", precision="fp8")
    monkeypatch.setattr(openvino_runtime, "cpu_description", lambda: {"name": "Old CPU", "capabilities": ["FP32", "INT8"]})
    with pytest.raises(ValueError, match="native bf16.*Old CPU"):
        Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="openvino", precision="bf16")


def test_predict_cli_uses_openvino_by_default_on_the_cpu(tiny_lorkd_ckpt, tiny_demo_data, tmp_path, conversions):
    case = _demo_cases(tiny_demo_data)[0]
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"input={tiny_demo_data / case['image']}", f"output_dir={tmp_path / 'out'}",
                 "labels=[liver,spleen]", "modality=ct", "progress=false", "writer.preview=false",
                 f"inference.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    rows = predict(compose_config("predict", overrides))
    assert {(r["label"], r["expert"], r["status"]) for r in rows} == {("liver", "abdomen", "ok"), ("spleen", "abdomen", "ok")}
    assert len(conversions) == 1 and list((tmp_path / "cache" / "openvino").glob("*/model.xml"))


def test_an_openvino_expert_returns_its_output_buffer_and_frees_its_buffers_after_each_volume(
    tiny_lorkd_ckpt, tmp_path, monkeypatch
):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", runtime="openvino", cache_dir=tmp_path, threads=1)
    net = predictor._network(predictor.check(["liver"], "ct")[0])[0]
    query_dim = net.compiled.input("queries").get_partial_shape()[1].get_length()
    out = net.probabilities(torch.randn(1, 1, *net.window), torch.randn(2, query_dim))
    assert out.shape == (1, 2, *net.window)
    assert out.data_ptr() == net.request.get_output_tensor(0).data.ctypes.data  # the request's buffer, not a copy
    assert [i.get_partial_shape().to_shape() for i in net.compiled.inputs] == [[1, 1, *net.window], [2, query_dim]]  # static
    released: list[bool] = []
    monkeypatch.setattr(net, "release_memory", lambda: released.append(True))
    image = np.random.default_rng(0).normal(100, 40, (40, 30, 12)).astype(np.float32)
    predictor.predict(image, ["liver", "spleen"], "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    assert released == [True]  # one group (the abdomen expert): released once, after its last window
