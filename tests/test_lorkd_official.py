"""Official LoRKD checkpoints: a file in the ``lorkd-imbalance-*.pth`` layout, built here from a tiny student by
re-layout code independent of the importer, loads with every key accounted for and routes exactly."""

import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import TINY, official_text_layout, tiny_sat

from lorkd.checkpoints.key_report import CheckpointMismatchError, KeyReport
from lorkd.checkpoints.lorkd_official import (
    OFFICIAL_REGIONS,
    _split,
    _student_state,
    convert_lorkd_official,
    load_lorkd_official,
)
from lorkd.experts import add_region_experts, route
from lorkd.models.sat import SAT
from lorkd.utils import CONFIG_DIR

RANKS = {"abdomen": 4, "brain": 4, "head_and_neck": 2, "lower_limb": 2, "pelvis": 2, "spine": 2, "thorax": 4, "upper_limb": 2}
_UNIT = re.compile(r"^backbone\.(encoder\.stages\.\d+\.0|decoder\.stages\.\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$")
OVERRIDES = {"decoder_heads": 4, "dropout": 0.0, "latent_stride": 16}  # what the keys do not record (tiny student)
_QKV = re.compile(r"^(.*\.multihead_attn)\.(q|k|v)_proj\.(weight|bias)$")


def official_layout(net: SAT, ranks=RANKS, seed=0, device="cpu") -> dict[str, torch.Tensor]:
    """What the official wrapper saves: ``model.module.`` + ``stages.{i}.conv.conv`` W0 + ``lora_{A,B}_list.{t}``
    (A (3r, 9Cin), B (3Cout, 3r), decoder r doubled) + stacked in_proj, and the backbone again under ``unet.``."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * 0.1

    state, out = net.state_dict(), {}
    for key, value in state.items():
        unit, qkv = _UNIT.match(key), _QKV.match(key)
        if unit:
            stage, i, part, kind = unit.groups()
            prefix = f"backbone.{stage}.stages.{i}"
            if part == "norm":
                out[f"{prefix}.norm.{kind}"] = value
                continue
            out[f"{prefix}.conv.conv.{kind}"] = value
            if kind == "weight":
                c_out, c_in = value.shape[:2]
                factor = 2 if stage.startswith("decoder") else 1
                for t, region in enumerate(OFFICIAL_REGIONS):
                    r = ranks[region] * factor
                    out[f"{prefix}.conv.lora_A_list.{t}"] = draw(3 * r, 9 * c_in)
                    out[f"{prefix}.conv.lora_B_list.{t}"] = draw(3 * c_out, 3 * r)
        elif qkv:
            base, which, kind = qkv.groups()
            if which == "q":
                out[f"{base}.in_proj_{kind}"] = torch.cat([state[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
        else:
            out[key] = value
    official = {f"model.module.{k}": v.clone() for k, v in out.items()}
    for key in list(official):
        if key.startswith("model.module.backbone."):
            official[f"unet.{key[len('model.module.backbone.'):]}"] = official[key]  # the same tensor, twice
    return official


def merged_by_hand(official: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """Plain SAT state with expert ``t`` folded in: W0 + 2·view(B_t @ A_t), computed from the file's tensors (fp64)."""
    official = {k: v.double() for k, v in official.items()}
    out = {}
    for key, value in official.items():
        if key.startswith("unet.") or ".lora_" in key:
            continue
        key = key[len("model.module.") :]
        m = re.match(r"^(backbone\..*)\.stages\.(\d+)\.(conv\.conv|norm)\.(weight|bias)$", key)
        if m:
            stage, i, part, kind = m.groups()
            if part == "conv.conv" and kind == "weight":
                prefix = f"model.module.{stage}.stages.{i}.conv"
                a, b = official[f"{prefix}.lora_A_list.{t}"], official[f"{prefix}.lora_B_list.{t}"]
                value = value + 2 * (b @ a).view(value.shape)
            out[f"{stage}.convs.{i}.{'conv' if part == 'conv.conv' else 'norm'}.{kind}"] = value
        elif ".in_proj_" in key:
            base, kind = key.split(".in_proj_")
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{base}.{name}_proj.{kind}"] = part
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    state = official_layout(tiny_sat())
    path = tmp_path_factory.mktemp("official") / "lorkd-imbalance-tiny.pth"
    torch.save({"model_state_dict": state}, path)
    return path, state


def _inputs(b=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 1, 16, 16, 16, generator=g, dtype=dtype), torch.randn(3, 64, generator=g, dtype=dtype)


def test_every_key_is_loaded_or_explained(official):
    path, state = official
    loaded = load_lorkd_official(path, **OVERRIDES)
    report = loaded.report
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    aliases = [k for k in state if k.startswith("unet.")]
    in_proj = [k.removeprefix("model.module.") for k in state if ".in_proj_" in k]
    assert sorted(report.explained) == sorted(aliases + in_proj)
    assert len(report.loaded) == len(loaded.net.state_dict())
    wrapped = sum(1 for k in state if k.startswith("model.module.") and k.endswith(".conv.conv.weight"))
    assert wrapped == 8 + 6
    backbone = [k for k in state if k.startswith("model.module.backbone.")]
    assert len(backbone) == wrapped * 20 + 3 * 2 == len(aliases)  # 20 keys per wrapped conv, 3 transposed convs
    assert loaded.experts.arguments() == {
        "regions": list(OFFICIAL_REGIONS), "ranks": RANKS, "decoder_rank_factor": 2,
        "scaling": 2.0, "style": "lorkd", "train_base": True,
    }  # fmt: skip
    assert loaded.preset is None  # the tiny student is neither official preset


def test_a_routed_layer_equals_the_conv_computed_from_the_file(official):
    path, state = official
    net = load_lorkd_official(path, **OVERRIDES).net.double()
    modules = dict(net.backbone.named_modules())
    g = torch.Generator().manual_seed(4)
    for ours, theirs, c_in in (
        ("encoder.stages.1.0.convs.0.conv", "backbone.encoder.stages.1.0.stages.0.conv", 8),  # strided
        ("decoder.stages.0.convs.1.conv", "backbone.decoder.stages.0.stages.1.conv", 32),
    ):
        layer = modules[f"base_model.model.{ours}"]
        x = torch.randn(2, c_in, 8, 8, 4, generator=g, dtype=torch.float64)
        w0 = state[f"model.module.{theirs}.conv.weight"].double()
        bias = state[f"model.module.{theirs}.conv.bias"].double()
        stride = 2 if ours.startswith("encoder.stages.1") else 1
        for t in range(8):
            a = state[f"model.module.{theirs}.lora_A_list.{t}"].double()
            b = state[f"model.module.{theirs}.lora_B_list.{t}"].double()
            expected = F.conv3d(x, w0 + 2 * (b @ a).view(w0.shape), bias, stride=stride, padding=1)
            with torch.no_grad(), route(net.backbone, torch.full((2,), t)):
                torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_the_routed_student_equals_a_plain_sat_merged_from_the_file(official):
    path, state = official
    net = load_lorkd_official(path, **OVERRIDES).net.double()
    x, q = _inputs()
    for t in (0, 3, 5, 7):
        plain = tiny_sat().double().eval()
        plain.load_state_dict(merged_by_hand(state, t), strict=True)
        with torch.no_grad(), route(net.backbone, torch.full((2,), t)):
            routed = net(x, q)
        torch.testing.assert_close(routed, plain(x, q), rtol=0, atol=1e-10)
    with torch.no_grad(), route(net.backbone, torch.tensor([0, 5])):
        mixed = net(x, q)
    assert not torch.allclose(mixed[0], mixed[1])


def test_wrong_preset_and_broken_files_fail_clearly(official, tmp_path):
    path, state = official
    with pytest.raises(CheckpointMismatchError, match=r"not a LoRKD-pro student \(features: checkpoint \[8, 16, 32, 64\]"):
        load_lorkd_official(path, student_preset="pro")

    def fails(broken, match):
        target = tmp_path / "broken.pth"
        torch.save({"model_state_dict": broken}, target)
        with pytest.raises(CheckpointMismatchError, match=match):
            load_lorkd_official(target, **OVERRIDES)

    alias = next(k for k in state if k.startswith("unet.") and k.endswith("conv.conv.weight"))
    fails({**state, alias: state[alias] + 1}, r"unexpected: unet\..* \(differs from")
    fails({k: v for k, v in state.items() if not k.endswith("lora_B_list.3")}, r"missing: .*lora_B\.lower_limb")
    extra = next(k for k in state if k.endswith("lora_A_list.7") and k.startswith("model."))
    fails({**state, extra.replace("list.7", "list.8"): state[extra]}, r"experts \[0, .*8\] in the checkpoint")
    fails({**state, "model.module.extra.weight": torch.zeros(1)}, "unexpected: extra.weight")
    # a key without the wrapper's ``model.`` prefix (here a real tensor's) is reported, never dropped
    unwrapped = next(k for k in state if k.startswith("model.module.") and k.endswith(".in_proj_weight"))[len("model.") :]
    fails({**state, unwrapped: state[f"model.{unwrapped}"]}, rf"1 unexpected.*\n  unexpected: {re.escape(unwrapped)}$")
    fails({**state, "optimizer_step": torch.zeros(1)}, r"unexpected: optimizer_step$")


@pytest.mark.parametrize(
    "preset, backbone, n_keys",
    [("nano", "unet_student_nano", 830), ("pro", "unet_nano", 994)],
)
def test_official_key_counts_and_every_real_size_key_has_its_place(preset, backbone, n_keys):
    """Real LoRKD-Nano / LoRKD-Pro sizes on the meta device: 830 / 994 keys, all mapped onto our student's keys."""
    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text())
    ranks = yaml.safe_load((CONFIG_DIR / "experts" / f"ranks_{preset}.yaml").read_text())["ranks"]
    args = {k: spec[k] for k in ("features", "strides", "n_convs", "proj_hidden", "mask_hidden")}
    with torch.device("meta"):
        net = SAT(**args)
        state = official_layout(net, ranks, device="meta")
        assert len(state) == n_keys
        report = KeyReport(source=preset)
        plain, lora = _split({k: v for k, v in state.items() if not k.startswith("unet.")}, report)
        net.backbone = add_region_experts(net.backbone, OFFICIAL_REGIONS, ranks, style="lorkd")
    mapped = _student_state(plain, lora, OFFICIAL_REGIONS)
    target = net.state_dict()
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)


def _text_encoder_file(tmp_path):
    """A SAT-layout text-encoder file with a tiny random BERT tower (hidden 32 -> queries of 64)."""
    state, lm_dir, _ = official_text_layout(tmp_path, query_dim=64)
    path = tmp_path / "tiny_text_encoder.pth"
    torch.save({"model_state_dict": state}, path)
    return path, lm_dir


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("converted")
    text, lm_dir = _text_encoder_file(tmp)
    out = convert_lorkd_official(
        official[0], tmp / "lorkd-tiny.ckpt", text_checkpoint=text, language_model_path=str(lm_dir),
        labels=["liver", "brainstem", "spleen"], net_overrides=OVERRIDES,
    )  # fmt: skip
    return out, text, lm_dir


def test_a_converted_checkpoint_loads_for_inference_and_exports_exactly(official, converted, tmp_path):
    from lorkd.checkpoints.export import export_experts
    from lorkd.checkpoints.exported import load_export
    from lorkd.checkpoints.loading import load_model

    path, text, lm_dir = converted
    source = load_lorkd_official(official[0], text_checkpoint=text, language_model_path=str(lm_dir), **OVERRIDES)
    loaded = load_model(path)
    assert loaded.experts == list(OFFICIAL_REGIONS) and loaded.data["patch_size"] == [288, 288, 96]
    assert loaded.region_map.region_of("liver", "ct") == "abdomen"
    with torch.no_grad():
        expected_q = source.text_encoder(source.text_encoder.language_model.encode(["liver"]), torch.tensor([0]))
        q = loaded.prompts.queries(["liver"], "ct")
    torch.testing.assert_close(q, expected_q)
    exported = load_export(export_experts(path, tmp_path / "export", regions=["abdomen", "spine"]))
    assert exported.experts == ["abdomen", "spine"]
    card = exported.card("spine")
    assert (card.expert.style, card.expert.scaling, card.expert.rank, card.expert.decoder_rank) == ("lorkd", 2.0, 2, 4)
    assert card.source["converted_from"]["path"] == str(official[0].resolve())
    x = _inputs(dtype=torch.float32)[0]
    for region in ("abdomen", "spine"):
        index = torch.full((2,), OFFICIAL_REGIONS.index(region))
        with torch.no_grad():
            with route(source.net.backbone, index):
                routed = source.net(x, q)
            with route(loaded.net.backbone, index):
                torch.testing.assert_close(loaded.net(x, q), routed, rtol=0, atol=0)
            merged = exported.net(region)(x, exported.prompts.queries(["liver"], "ct"))
        torch.testing.assert_close(merged, routed, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_converted_checkpoint_starts_a_lorkd_fine_tuning(converted, tiny_teacher_ckpt, region_map):
    """``student_init=checkpoint`` with ``experts.style=lorkd`` picks up the official base and experts exactly."""
    from functools import partial

    from lorkd.checkpoints.loading import load_teacher, read_student_state
    from lorkd.checkpoints.schema import ExpertsSpec
    from lorkd.modules.lorkd_module import LoRKDModule

    path = converted[0]
    module = LoRKDModule(
        teacher=load_teacher(tiny_teacher_ckpt), student=SAT(**TINY),
        experts=ExpertsSpec.for_regions(region_map.regions, RANKS, style="lorkd"),
        optimizer=partial(torch.optim.AdamW, lr=1e-4), region_map=region_map,
        student_init="checkpoint", student_state=read_student_state(path),
    )  # fmt: skip
    stored = torch.load(path, weights_only=True)["state_dict"]
    for key, value in module.student.state_dict().items():
        assert torch.equal(value, stored[f"student.{key}"]), key
    assert all(p.requires_grad for n, p in module.student.backbone.named_parameters() if ".lora_" in n)


def test_the_loader_recognises_a_official_file_and_builds_what_its_conversion_holds(official, converted):
    """``load_model`` on the official file itself (with its text encoder files) equals loading its conversion."""
    from lorkd.checkpoints.loading import load_model

    path, text, lm_dir = converted
    with pytest.raises(ValueError, match="is an official LoRKD checkpoint: also give its paired text encoder"):
        load_model(official[0])
    direct = load_model(official[0], text_checkpoint=text, language_model_path=str(lm_dir), net_overrides=OVERRIDES)
    stored = load_model(path)
    assert direct.experts == stored.experts == list(OFFICIAL_REGIONS) and direct.source == str(official[0])
    assert direct.meta.converted_from["path"] == str(official[0].resolve()) and direct.meta.experts.style == "lorkd"
    state = stored.net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in direct.net.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(direct.prompts.queries(["liver"], "ct"), stored.prompts.queries(["liver"], "ct"))


def test_a_official_file_is_read_into_a_record_and_built_once(official, converted, monkeypatch):
    """The reader builds nothing; ``load_model`` builds the student and the text encoder once each (it used to
    build both, turn them into a checkpoint dict, and build that again), recording what the conversion records."""
    from lorkd.checkpoints.loading import load_model, read_source
    from lorkd.models.sat import SAT
    from lorkd.models.text import TextEncoder

    path, text, lm_dir = converted
    built = {"SAT": 0, "TextEncoder": 0}
    for cls in (SAT, TextEncoder):
        init = cls.__init__

        def counted(self, *args, _init=init, _name=cls.__name__, **kwargs):
            built[_name] += 1
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    record = read_source(official[0], text, str(lm_dir), OVERRIDES)
    assert built == {"SAT": 0, "TextEncoder": 0}
    assert record.provenance.reader == "official-lorkd" and record.meta.kind == "lorkd"
    assert any(k.startswith("student.") for k in record.tensors) and any(k.startswith("language_model.") for k in record.tensors)
    loaded = load_model(official[0], text_checkpoint=text, language_model_path=str(lm_dir), net_overrides=OVERRIDES)
    assert built == {"SAT": 1, "TextEncoder": 1}
    stored = load_model(path)
    assert loaded.meta.parameter_counts == stored.meta.parameter_counts
    assert loaded.meta.net == stored.meta.net and loaded.meta.text_encoder == stored.meta.text_encoder
    assert set(stored.prompts.state_dict()["labels"]) < set(loaded.prompts.state_dict()["labels"])  # every region-map label
    assert loaded.prompts.language_model is None  # encoded once, then let go, as in a conversion
