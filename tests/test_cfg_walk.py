"""``scripts/cfg_walk.py``: the walk of predict's and eval's ``cfg`` (issue 25, item 1)."""

from __future__ import annotations

import sys

from lorkd.utils import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))

import cfg_walk  # noqa: E402


def test_predict_cfg_walk_reaches_the_loader_and_stops_within_its_target():
    walk = cfg_walk.walk(*cfg_walk.ENTRIES["predict"])
    assert "lorkd.commands.predict:predict" in walk.stops
    assert "lorkd.checkpoints.loading:read_source" in walk.stops  # the checkpoint options reach its reader
    assert len(walk.stops) <= 40
    assert not [c for c in walk.climbs if c[1].startswith("lorkd.checkpoints")]


def test_eval_cfg_walk_stops_within_its_target():
    walk = cfg_walk.walk(*cfg_walk.ENTRIES["eval"])
    assert "lorkd.checkpoints.loading:read_source" in walk.stops
    assert not walk.climbs  # evaluation starts up as predict does, not through lorkd.api
    assert len(walk.stops) <= 40


def test_values_walk_follows_a_path_into_the_functions_that_read_it():
    nodes = cfg_walk.walk(*cfg_walk.ENTRIES["predict"])
    values = cfg_walk.walk(*cfg_walk.ENTRIES["predict"], values=True)
    assert "lorkd.data.manifest:read_manifest" in values.stops
    assert "lorkd.data.manifest:read_manifest" not in nodes.stops
    assert set(nodes.stops) < set(values.stops)
