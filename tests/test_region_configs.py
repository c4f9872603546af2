"""Region maps from configs/regions: defaults lists resolved like Hydra, inside or outside a Hydra app."""

import pytest
from helpers import compose_config
from hydra.utils import instantiate

from lorkd.regions import RegionMap

EXPERT_ORDER = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]


def test_sat49_and_demo_extend_each_other():
    sat49, demo = RegionMap.from_config(), RegionMap.from_config("demo")
    assert sat49.regions == demo.regions == EXPERT_ORDER
    assert len(sat49.label_region) == 429
    assert set(demo.label_region) - set(sat49.label_region) == {"ct_liver tumor"}
    assert demo.label_region["ct_liver tumor"] == "abdomen" and "ct_liver tumor" in demo.abnormal
    assert sat49.abnormal < demo.abnormal


def test_equals_what_the_hydra_apps_instantiate():
    cfg = compose_config("train", ["regions=demo"])
    assert instantiate(cfg.regions).to_dict() == RegionMap.from_config("demo").to_dict()


def test_unknown_name_lists_the_known_maps():
    with pytest.raises(FileNotFoundError, match=r"'sat50'.*known: checkpoint, demo, sat49"):
        RegionMap.from_config("sat50")
