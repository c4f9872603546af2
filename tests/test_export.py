"""Expert export: merged standalone models per region, model cards with sha256, adapters, and the peft-free loader."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.adapters import load_adapters
from lorkd.checkpoints.export import export_experts
from lorkd.checkpoints.exported import (
    CARD,
    INDEX,
    MODEL,
    PROMPTS,
    ExportIntegrityError,
    load_export,
    read_card,
)
from lorkd.checkpoints.loading import load_model
from lorkd.checkpoints.schema import DeployedExpert, ModelCard
from lorkd.experts import route
from lorkd.io import sha256_file
from lorkd.models.sat import SAT
from lorkd.models.unet import PlainConvUNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(distinct_lorkd_ckpt):
    return load_model(distinct_lorkd_ckpt)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, 16, generator=g)


def test_export_layout_and_index(tiny_export, student):
    index = json.loads((tiny_export / "index.json").read_text())
    assert index["expert_order"] == student.experts and index["regions"] == {r: r for r in student.experts}
    for region in student.experts:
        assert sorted(p.name for p in (tiny_export / region).iterdir()) == [
            "model.safetensors", "model_card.json", "prompts.safetensors", "text_head.safetensors",
        ]  # fmt: skip
        assert (tiny_export / "adapters" / region / "adapter_model.safetensors").is_file()
    assert (tiny_export / "adapters" / "base.safetensors").is_file()
    assert not [p for p in tiny_export.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_each_exported_expert_equals_the_routed_student(tiny_export, student):
    exported = load_export(tiny_export)
    x = _inputs()
    labels, modality = ["liver", "spleen", "heart"], "ct"
    q = student.prompts.queries(labels, modality)
    torch.testing.assert_close(exported.prompts.queries(labels, modality), q, rtol=0, atol=0)
    for k, region in enumerate(student.experts):
        with torch.no_grad(), route(student.net.backbone, torch.full((2,), k)):
            routed = student.net(x, q)
        with torch.no_grad():
            merged = exported.net(region)(x, q)
        torch.testing.assert_close(merged, routed, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), route(student.net.backbone, torch.full((2,), -1)):
        torch.testing.assert_close(exported.base_net()(x, q), student.net(x, q), rtol=1e-4, atol=1e-5)


def test_an_exported_expert_has_the_student_base_size_and_only_plain_modules(tiny_export, tiny_lorkd_ckpt):
    exported = load_export(tiny_export, regions=["thorax"], preload=True)
    base = schema.read(torch.load(tiny_lorkd_ckpt, weights_only=True), "ckpt").parameter_counts["student_base"]
    expert = exported.expert("thorax")
    assert expert.parameter_count == exported.parameter_count == base
    assert type(expert.net) is SAT and type(expert.net.backbone) is PlainConvUNet
    assert all(type(m).__module__.startswith(("torch.", "lorkd.")) for m in expert.net.modules())
    with pytest.raises(KeyError, match="no exported expert 'brain'"):
        exported.net("brain")


def test_the_model_card_round_trips(tiny_export, distinct_lorkd_ckpt):
    meta = schema.read(torch.load(distinct_lorkd_ckpt, weights_only=True), "ckpt")
    for region in ("abdomen", "brain"):
        card = read_card(tiny_export / region)
        assert ModelCard.from_json(json.loads(json.dumps(card.to_json())), "card") == card == load_export(tiny_export).card(region)
        assert SAT(**card.architecture["arguments"]).config == meta.net
        assert card.architecture["preset"] == "unet_small_lite"
        assert card.region == region and card.expert_index == meta.experts.regions.index(region)
        rank = meta.experts.ranks[region]
        assert card.expert == DeployedExpert(
            style="peft", scaling=2.0, rank=rank, decoder_rank=2 * rank, decoder_rank_factor=2,
            parameters=meta.parameter_counts[f"expert_{region}"], merged_into_base=True, trained_base=True,
        )  # fmt: skip
        assert card.data == meta.data
        assert card.parameter_counts["model"] == meta.parameter_counts["student_base"]
        assert card.parameter_counts["teacher"] == meta.parameter_counts["teacher"]
        assert set(card.versions) == {"lorkd", "torch", "peft", "safetensors", "python"}
        assert card.files[MODEL]["sha256"] == sha256_file(tiny_export / region / MODEL)
        assert card.text_head == meta.text_encoder
        assert card.prompt_bank["labels"] == len(meta.prompt_bank["labels"])
    labels = read_card(tiny_export / "abdomen").labels
    assert "ct_liver" in labels["with_cached_prompt"] and "ct_liver tumor" in labels["abnormal"]
    assert set(labels["with_cached_prompt"]) <= set(labels["routed"])
    assert "ct_brainstem" not in labels["routed"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index: index.pop("cards_sha256"), r"index\.json: missing cards_sha256"),
        (lambda index: index.update(format="lorkd-export/9"), r"index\.json: format 'lorkd-export/9', expected 'lorkd-export/1'"),
        (None, r"index\.json: not valid JSON"),
    ],
)
def test_a_malformed_index_is_an_error_naming_it(tiny_export, tmp_path, edit, message):
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    if edit is None:
        (copy / INDEX).write_text("{")
    else:
        index = json.loads((copy / INDEX).read_text())
        edit(index)
        (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        load_export(copy)


def test_tampered_files_fail_the_sha256_check(tiny_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    with open(copy / "brain" / MODEL, "r+b") as f:
        f.seek(-4, 2)
        last = f.read(4)
        f.seek(-4, 2)
        f.write(bytes(b ^ 0xFF for b in last))
    exported = load_export(copy)
    exported.net("abdomen")  # untouched experts still load
    with pytest.raises(ExportIntegrityError, match=r"brain/model\.safetensors: sha256 .* does not match"):
        exported.net("brain")
    (copy / "abdomen" / PROMPTS).write_bytes((copy / "abdomen" / PROMPTS).read_bytes() + b" ")
    with pytest.raises(ExportIntegrityError, match=r"abdomen/prompts\.safetensors"):
        load_export(copy)
    card = json.loads((copy / "thorax" / CARD).read_text())
    card["expert"]["rank"] = 99
    (copy / "thorax" / CARD).write_text(json.dumps(card))
    with pytest.raises(ExportIntegrityError, match=r"thorax/model_card\.json"):
        load_export(copy, regions=["thorax"])


def test_load_export_runs_without_peft(tiny_export, student, tmp_path):
    """In a fresh interpreter where ``import peft`` fails, the export loads and predicts the same logits."""
    x = _inputs()
    q = student.prompts.queries(["liver"], "ct")
    torch.save({"x": x, "q": q}, tmp_path / "inputs.pt")
    script = f"""
import sys
sys.modules["peft"] = None  # any import of peft now raises ImportError
import torch
from lorkd.checkpoints.exported import load_export
exported = load_export({str(tiny_export)!r}, preload=True)
inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
with torch.no_grad():
    out = exported.net("spine")(inputs["x"], exported.prompts.queries(["liver"], "ct"))
assert not [n for n, m in sys.modules.items() if n.startswith("peft") and m is not None]
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    with torch.no_grad(), route(student.net.backbone, torch.full((2,), student.experts.index("spine"))):
        routed = student.net(x, q)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), routed, rtol=1e-4, atol=1e-5)


def test_adapters_reload_into_the_same_routed_student(tiny_export, student):
    net = load_adapters(tiny_export / "adapters").eval()
    x = _inputs()
    q = student.prompts.queries(["liver"], "ct")
    region = torch.tensor([0, 6])  # a mixed batch: abdomen, thorax
    with torch.no_grad(), route(net.backbone, region):
        reloaded = net(x, q)
    with torch.no_grad(), route(student.net.backbone, region):
        torch.testing.assert_close(reloaded, student.net(x, q), rtol=0, atol=0)
    assert all(p.requires_grad for p in net.backbone.parameters())  # train_base: W0 and every expert train


def test_an_existing_target_is_kept_unless_overwrite(tiny_export, distinct_lorkd_ckpt, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_experts(distinct_lorkd_ckpt, tiny_export, regions=["brain"])
    other = tmp_path / "not_an_export"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an expert export"):
        export_experts(distinct_lorkd_ckpt, other, regions=["brain"], overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    target = tmp_path / "again"
    shutil.copytree(tiny_export, target)
    export_experts(distinct_lorkd_ckpt, target, regions=["brain"], overwrite=True)
    assert load_export(target).experts == ["brain"] and not (target / "abdomen").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "not_an_export"]


@pytest.mark.slow
def test_the_export_command(distinct_lorkd_ckpt, tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "scripts/export_experts.py", f"ckpt_path={distinct_lorkd_ckpt}", f"output_dir={out}", "only=[pelvis,spine]"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    assert load_export(out).experts == ["pelvis", "spine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # a Hydra app without a run folder
    result = subprocess.run(
        [sys.executable, "scripts/export_experts.py", f"ckpt_path={distinct_lorkd_ckpt}", f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "overwrite=true" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "scripts/convert_lorkd_official.py", f"ckpt_path={distinct_lorkd_ckpt}", f"output_path={tmp_path / 'x.ckpt'}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()  # every missing value named, before any work (exit 2)
    assert result.returncode == 2 and "2 required values are missing" in lines[0] and len(lines) == 3, result.stderr
    assert lines[1].split()[0] == "official.text_checkpoint" and lines[2].split()[0] == "official.language_model_path"


def test_an_export_follows_the_umask_like_every_other_file(distinct_lorkd_ckpt, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out = export_experts(distinct_lorkd_ckpt, tmp_path / "export", regions=["brain"])
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    expected = {p: 0o755 if Path(tmp_path, p).is_dir() else 0o644 for p in modes}
    assert {p: oct(m) for p, m in modes.items() if m != expected[p]} == {}
