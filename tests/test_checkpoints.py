import pytest
import torch
from helpers import official_text_layout, official_vision_layout, tiny_sat

from lorkd.checkpoints.key_report import CheckpointMismatchError
from lorkd.checkpoints.sat_official import (
    infer_sat_config,
    load_sat_text_encoder,
    load_sat_vision,
    sat_model_from_checkpoint,
)


def _save(tmp_path, state, name="SAT_Nano.pth"):
    path = tmp_path / name
    torch.save({"step": 10, "model_state_dict": state}, path)
    return path


def _same_output(a, b):
    a.eval(), b.eval()
    x, q = torch.randn(2, 1, 32, 32, 16), torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x, q), b(x, q), rtol=0, atol=0)


def test_official_vision_checkpoint_round_trip_with_strict_accounting(tmp_path):
    source = tiny_sat(deep_supervision=True)
    path = _save(tmp_path, official_vision_layout(source))
    target = tiny_sat()  # no deep supervision: DS heads are explained, not loaded
    torch.manual_seed(1)
    for p in target.parameters():
        p.data.normal_()
    report = load_sat_vision(target, path)
    assert report.ok and not report.missing and not report.unexpected
    assert sum("all_modules" in k for k in report.explained) == 2 * 2 * (4 * 2 + 3 * 2)  # conv+norm, w+b
    assert sum("in_proj" in k for k in report.explained) == 2 * 2
    assert sum(k.startswith("mid_mask_embed_proj") for k in report.explained) == 2 * 4
    _same_output(source, target)


def test_architecture_is_read_off_the_checkpoint(tmp_path):
    source = tiny_sat()
    path = _save(tmp_path, official_vision_layout(source))
    config = infer_sat_config(torch.load(path, weights_only=True)["model_state_dict"])
    assert config["features"] == [8, 16, 32, 64] and config["n_convs"] == 2 and config["decoder_layers"] == 2
    model, report = sat_model_from_checkpoint(path, decoder_heads=4, dropout=0.0, latent_stride=16)
    assert report.ok
    _same_output(source, model)


def test_wrong_backbone_preset_fails_loudly_with_a_hint(tmp_path):
    path = _save(tmp_path, official_vision_layout(tiny_sat(n_convs=3)))
    target = tiny_sat()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*\n.*hint: .*n_convs: checkpoint 3 vs model 2"):
        load_sat_vision(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded

    wider = _save(tmp_path, official_vision_layout(tiny_sat(features=[8, 16, 32, 96])), "wider.pth")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_sat_vision(tiny_sat(), wider)


def test_unexplained_keys_and_inconsistent_aliases_fail(tmp_path):
    state = official_vision_layout(tiny_sat())
    with pytest.raises(CheckpointMismatchError, match="unexpected: extra.weight"):
        load_sat_vision(tiny_sat(), {"model_state_dict": {**state, "module.extra.weight": torch.zeros(1)}})
    alias = next(k for k in state if "all_modules.0.weight" in k)
    broken = {**state, alias: state[alias] + 1}
    with pytest.raises(CheckpointMismatchError, match="all_modules"):
        load_sat_vision(tiny_sat(), broken)
    missing = {k: v for k, v in state.items() if "mask_embed_proj" not in k}
    with pytest.raises(CheckpointMismatchError, match="missing: mask_embed_proj"):
        load_sat_vision(tiny_sat(), missing)
    with pytest.raises(CheckpointMismatchError, match="missing: mid_mask_embed_proj"):
        load_sat_vision(tiny_sat(deep_supervision=True), state)
    assert load_sat_vision(tiny_sat(deep_supervision=True), state, allow_missing_ds=True).ok


def test_official_text_encoder_checkpoint(tmp_path):
    """A SAT text-encoder file (text_tower.biolord.* + head) with a small random BERT as the tower."""
    state, lm_dir, tower = official_text_layout(tmp_path, query_dim=16, layers=2)
    state["module.atlas_tower.fc.weight"] = torch.zeros(2)  # SAT's unused atlas tower: explained, not loaded
    proj0, proj2 = state["module.projection_layer.0.weight"], state["module.projection_layer.2.weight"]
    modality = state["module.modality_embed.weight"]
    path = _save(tmp_path, state, "text_encoder.pth")
    encoder, report = load_sat_text_encoder(path, str(lm_dir))
    assert report.ok and "module.atlas_tower.fc.weight" not in report.loaded
    assert encoder.query_dim == 16 and encoder.hidden_dim == 32
    emb = encoder.language_model.encode(["liver"])
    ids, mask = encoder.language_model.tokenize(["liver"])
    with torch.no_grad():
        expected = tower(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
    torch.testing.assert_close(emb, expected)
    q = encoder(emb, torch.tensor([1]))
    torch.testing.assert_close(q[0], (torch.nn.functional.gelu(emb @ proj0.T) @ proj2.T + modality[1])[0])
