"""The checkpoint record (lorkd.checkpoints.schema): round trip, versions, clear errors."""

from __future__ import annotations

import pytest
import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.schema import CheckpointMeta, ExpertsSpec, TeacherSource, TextHead


def _meta(**changes) -> CheckpointMeta:
    return CheckpointMeta(
        kind="lorkd",
        text_encoder=TextHead(hidden_dim=384, query_dim=64, proj_hidden=64),
        prompt_bank={"labels": ["liver"], "embeddings": torch.ones(1, 384), "fingerprint": "abc"},
        net={"features": [8, 16]},
        region_map={"regions": ["abdomen"], "labels": {"abdomen": ["ct_liver"]}, "abnormal": []},
        data={"patch_size": [32, 32, 16]},
        experts=ExpertsSpec(regions=["abdomen"], ranks={"abdomen": 4}, style="lorkd"),
        teacher=TeacherSource(path="/t.ckpt", fingerprint="0123456789abcdef", net={"features": [8, 16, 32]}),
        parameter_counts={"teacher": 10, "student_base": 5},
        **changes,
    )


def test_a_record_round_trips_through_torch_save_with_weights_only(tmp_path):
    meta = _meta()
    path = tmp_path / "x.ckpt"
    torch.save(schema.write({"state_dict": {}}, meta), path)
    back = schema.read(torch.load(path, weights_only=True), str(path))
    assert back.experts == meta.experts and back.teacher == meta.teacher and back.text_encoder == meta.text_encoder
    assert back.version == schema.VERSION and back.data == meta.data and back.net == meta.net
    torch.testing.assert_close(back.prompt_bank["embeddings"], meta.prompt_bank["embeddings"])
    assert back.experts.arguments() == {
        "regions": ["abdomen"], "ranks": {"abdomen": 4}, "decoder_rank_factor": 2, "scaling": 2.0,
        "style": "lorkd", "train_base": True,
    }  # fmt: skip


def test_files_without_a_record_or_a_version():
    assert schema.read({"state_dict": {}}, "official.pth") is None  # an official file
    stored = schema.write({}, _meta())
    del stored[schema.KEY]["version"]  # checkpoints written before the field existed
    assert schema.read(stored, "old.ckpt").version == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, r"new.ckpt: checkpoint metadata version 2 is not supported \(this lorkd reads version 1"),
        ({"kind": "unet"}, r"new.ckpt: unknown checkpoint kind 'unet'"),
        ({"experts": None}, r"new.ckpt: a LoRKD checkpoint without its experts spec"),
        ({"text_encoder": {"hidden_dim": 1}}, r"new.ckpt: malformed checkpoint metadata"),
    ],
)
def test_unknown_or_malformed_records_are_clear_errors(change, message):
    stored = schema.write({}, _meta())
    stored[schema.KEY].update(change)
    if change.get("experts", 0) is None:
        del stored[schema.KEY]["experts"]
    with pytest.raises(ValueError, match=message):
        schema.read(stored, "new.ckpt")


def test_sat_preprocessing_recorded_for_official_files_is_the_default_recipe():
    """The plain values the official-LoRKD converter records (it imports no lorkd.data) are SAT's recipe."""
    from lorkd.data.transforms import PreprocessConfig

    assert schema.SAT_PREPROCESS == PreprocessConfig().to_dict()
    assert PreprocessConfig.coerce(schema.SAT_PREPROCESS) == PreprocessConfig()
