import json
import weakref
from pathlib import Path

import pytest
import torch
from helpers import compose_config, tiny_sat
from hydra.utils import instantiate

from lorkd.models.positional import positional_encoding_3d
from lorkd.models.sat import SAT

DATA = Path(__file__).parent / "data"


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_net(model_cfg: str, backbone: str | None = None, **net) -> SAT:
    overrides = ["~data", f"model={model_cfg}"] + ([f"backbone@model.net={backbone}"] if backbone else [])
    overrides += [f"model.net.{k}={v}" for k, v in net.items()]
    cfg = compose_config("train", overrides)
    with torch.device("meta"):
        return instantiate(cfg.model.net)


@pytest.mark.parametrize(
    "model_cfg,backbone,ds,expected",
    [
        ("sat_nano", None, False, 109_194_624),
        ("sat_nano", None, True, 110_277_568),
        ("sat_pro", None, False, 475_561_344),
        ("sat_pro", None, True, 477_087_360),
        ("sat_nano", "unet_student_nano", False, 57_235_872),
    ],
)
def test_exact_parameter_counts_from_configs(model_cfg, backbone, ds, expected):
    net = _meta_net(model_cfg, backbone, deep_supervision=ds)
    assert _count(net) == expected


def test_state_dict_matches_sat_reference_keys():
    ref = json.loads((DATA / "sat_vision_state_dict.json").read_text())
    for name, model_cfg, ds in [("UNET", "sat_nano", False), ("UNET-L+ds", "sat_pro", True)]:
        net = _meta_net(model_cfg, deep_supervision=ds)
        ours = {k: list(v.shape) for k, v in net.state_dict().items()}
        expected = {
            k: v for k, v in ref[name]["keys"].items() if ".all_modules." not in k and ".in_proj_" not in k
        }
        for k, v in ref[name]["keys"].items():
            if ".in_proj_weight" in k or ".in_proj_bias" in k:
                base, kind = k.rsplit(".in_proj_", 1)
                for p in "qkv":
                    expected[f"{base}.{p}_proj.{kind}"] = [v[0] // 3, *v[1:]]
        assert ours == expected
        assert _count(net) == ref[name]["n_params_unique"]


def test_real_preset_shapes_on_meta_device():
    net = _meta_net("sat_nano", deep_supervision=True)
    with torch.device("meta"):
        x = torch.zeros(2, 1, 288, 288, 96)
        skips = net.backbone(net.check_input(x)).skips
        out = net(x, torch.zeros(5, 768), return_aux=True)
        features = net.encode(x)
    assert [tuple(s.shape) for s in skips] == [
        (2, 64, 288, 288, 96), (2, 64, 144, 144, 48), (2, 128, 72, 72, 24),
        (2, 256, 36, 36, 12), (2, 512, 18, 18, 6), (2, 768, 9, 9, 3),
    ]  # fmt: skip
    assert tuple(out.logits.shape) == (2, 5, 288, 288, 96)
    assert [tuple(a.shape[2:]) for a in out.aux_logits] == [(144, 144, 48), (72, 72, 24), (36, 36, 12)]
    assert tuple(features.memory.shape) == (2, 243, 768)
    assert tuple(features.latent.shape) == (2, 1792, 9, 9, 3)
    pro = _meta_net("sat_pro")
    student = _meta_net("sat_nano", "unet_student_nano")
    with torch.device("meta"):
        assert tuple(pro.encode(x).per_voxel[0].shape) == (2, 128, 288, 288, 96)
        f = student.encode(x)
        assert tuple(f.per_voxel[0].shape) == (2, 32, 288, 288, 96)
        assert tuple(f.latent.shape) == (2, 992, 9, 9, 3)


def test_tiny_forward_any_multiple_of_the_stride():
    net = tiny_sat().eval()
    q = torch.randn(3, 64)
    for shape in [(64, 64, 32), (48, 80, 16)]:
        assert net(torch.randn(2, 1, *shape), q).shape == (2, 3, *shape)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(2, 1, 40, 64, 32), q)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(2, 2, 64, 64, 32), q)


def test_without_autograd_skips_and_concatenations_are_freed_once_used():
    net = tiny_sat().eval()
    x, q = torch.randn(2, 1, 32, 32, 16), torch.randn(3, 64)
    kept = net.backbone(net.check_input(x), pool=net.pool_kernels)  # autograd on: training keeps every skip
    assert len(kept.skips) == len(net.backbone.encoder.stages)
    trained = net(x, q).detach()
    skips, cats, alive = [], [], []
    for stage in net.backbone.encoder.stages:
        stage.register_forward_hook(lambda m, args, out: skips.append(weakref.ref(out)))
    for i, stage in enumerate(net.backbone.decoder.stages):
        first, second = stage.convs[0], stage.convs[1]
        first.register_forward_pre_hook(lambda m, args: cats.append(weakref.ref(args[0])))
        # the skip this stage concatenated, and the concatenation itself, once the first conv is done
        second.register_forward_pre_hook(lambda m, args, i=i: alive.append((skips[-(i + 2)]() is not None, cats[-1]() is not None)))
    with torch.inference_mode():
        official = net.backbone(net.check_input(x), pool=net.pool_kernels)
        inferred = net(x, q)
    assert official.skips == [] and [p.shape for p in official.pooled] == [p.shape for p in kept.pooled]
    assert alive == [(False, False)] * 2 * len(net.backbone.decoder.stages)
    assert torch.equal(inferred, trained)


def test_queries_are_decoded_independently():
    net = tiny_sat().eval()
    x = torch.randn(2, 1, 32, 32, 16)
    q = torch.randn(4, 64)
    with torch.no_grad():
        features = net.encode(x)
        full = net.decode(features, q)[0]
        reordered = net.decode(features, q[[2, 0, 3, 1]])[0]
        alone = net.decode(features, q[1:2])[0]
        chunked = torch.cat([net.decode(features, c)[0] for c in q.split(3)], dim=1)
    torch.testing.assert_close(reordered, full[:, [2, 0, 3, 1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[:, 0], full[:, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_positional_encoding_matches_sat_test_vector():
    pe = positional_encoding_3d((9, 9, 3), 768)
    assert pe.shape == (243, 768)
    assert torch.allclose(pe[0, :256], torch.tensor([0.0, 1.0]).repeat(128))
    expected = torch.tensor([0.841471, 0.540302, 0.801962, 0.597375])
    torch.testing.assert_close(pe[1, 512:516], expected, atol=1e-5, rtol=0)  # token (h0, w0, d1)
    torch.testing.assert_close(pe[3, 256:260], expected, atol=1e-5, rtol=0)  # token (h0, w1, d0)
    torch.testing.assert_close(pe[27, 0:4], expected, atol=1e-5, rtol=0)  # token (h1, w0, d0)
    assert abs(pe.double().sum().item() - 92998.66) < 0.05


def test_deep_supervision_heads_follow_decoder_scales():
    net = tiny_sat(deep_supervision=True).eval()
    out = net(torch.randn(2, 1, 32, 32, 16), torch.randn(2, 64), return_aux=True)
    assert [tuple(a.shape) for a in out.aux_logits] == [(2, 2, 16, 16, 8), (2, 2, 8, 8, 4)]


def test_mask_head_without_final_gelu_keeps_sat_keys_and_frees_the_sign():
    """``mask_head_act=False`` (demo knob) drops the mask heads' last GELU: same keys, so the same weights
    give the pre-activation embedding, which can be more negative than GELU's minimum (-0.17)."""
    sat, free = tiny_sat(deep_supervision=True), tiny_sat(deep_supervision=True, mask_head_act=False)
    assert sat.state_dict().keys() == free.state_dict().keys() and sat.config["mask_head_act"] is True
    free.load_state_dict(sat.state_dict())
    q = 3 * torch.randn(16, 64)
    for a, b in zip([sat.mask_embed_proj, *sat.mid_mask_embed_proj], [free.mask_embed_proj, *free.mid_mask_embed_proj]):
        torch.testing.assert_close(a(q), torch.nn.functional.gelu(b(q)))
        assert a(q).min() > -0.2 and b(q).min() < -0.2


def test_demo_student_config_is_plain_and_loads_weights_only(tmp_path):
    """The demo student gives n_convs per stage as Hydra lists; the network's config (written into every
    checkpoint) must hold plain ints, or torch.load(weights_only=True) refuses the checkpoint
    (omegaconf.ListConfig is not an allowed global)."""
    net = _meta_net("sat_tiny", "unet_small_lite", query_dim=64)  # the demo's query size
    assert net.config["n_convs"] == [2, 2, 1, 1] and type(net.config["n_convs"]) is list
    assert net.config["n_convs_decoder"] == [2, 2, 1] and type(net.config["n_convs_decoder"]) is list
    torch.save({"config": net.config}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["config"] == net.config
    teacher = _count(_meta_net("sat_tiny", "unet_small", query_dim=64))
    assert (_count(net), teacher) == (828_016, 1_492_336)  # the README's table
    assert _count(net) <= 0.6 * teacher  # LoRKD's deployed expert: at most 60% of its teacher
