"""SAT aggregation on hand-built rows, CSV round trip, JSON, Markdown and PNG reports."""

import json
import math

import pytest

from lorkd.evaluation.report import (
    aggregate,
    deduplicate,
    plot_dice_by_region,
    read_per_case_csv,
    render_markdown,
    summarise,
    write_per_case_csv,
    write_summary_json,
)


def row(dataset, case, label, group, dice, nsd, modality="ct", region=None, **extra):
    region = region or ("abdomen" if group == "abnormal" else group)
    counts = dict(tp=10, fp=1, fn=2, n_pred=11, n_ref=12)
    return dict(
        dataset=dataset, case=case, label=label, region=region, modality=modality, group=group,
        dice=dice, nsd=nsd, **counts, **extra,
    )  # fmt: skip


ROWS = [
    row("A", "c1", "liver", "abdomen", 0.9, 0.8),
    row("A", "c2", "liver", "abdomen", 0.7, 0.6),
    row("A", "c1", "liver tumor", "abnormal", 0.5, 0.4),
    row("A", "c2", "liver tumor", "abnormal", 0.3, 0.2),
    row("A", "c1", "liver", "abdomen", 0.0, 0.0),  # the same case again from another rank
    row("B", "c1", "liver", "abdomen", 0.6, 0.5),
    row("B", "c1", "lung", "thorax", 1.0, 0.9),
    row("C", "c1", "liver", "abdomen", 0.5, 0.5, modality="mri"),
]


def by(items, key):
    return {item[key]: item for item in items}


def test_deduplicate_keeps_the_first_row():
    unique = deduplicate(ROWS)
    assert len(unique) == len(ROWS) - 1
    assert [r["dice"] for r in unique if (r["dataset"], r["case"], r["label"]) == ("A", "c1", "liver")] == [
        0.9
    ]


def test_sat_aggregation_case_label_dataset_mod_label_region():
    s = summarise(ROWS, "sat", 1.0, "preprocessed")
    assert (s["n_rows"], s["n_duplicates_dropped"], s["n_cases"]) == (7, 1, 4)
    labels = {(x["dataset"], x["label"]): x for x in s["per_label"]}
    assert labels["A", "liver"]["dice"] == pytest.approx(0.8) and labels["A", "liver"][
        "nsd"
    ] == pytest.approx(0.7)
    assert labels["A", "liver"]["n_cases"] == 2
    assert labels["A", "liver tumor"]["dice"] == pytest.approx(0.4)
    datasets = by(s["per_dataset"], "dataset")
    assert datasets["A"]["dice"] == pytest.approx(0.6) and datasets["A"]["nsd"] == pytest.approx(0.5)
    assert datasets["B"]["dice"] == pytest.approx(0.8) and datasets["B"]["nsd"] == pytest.approx(0.7)
    assert (datasets["A"]["n_labels"], datasets["A"]["n_cases"], datasets["C"]["modalities"]) == (2, 2, "mri")
    mod_labels = by(s["per_mod_label"], "mod_label")
    assert mod_labels["ct_liver"]["dice"] == pytest.approx(0.7) and mod_labels["ct_liver"]["n_datasets"] == 2
    assert mod_labels["mri_liver"]["dice"] == pytest.approx(0.5)
    groups = by(s["per_group"], "group")
    assert [g["group"] for g in s["per_group"]] == ["abdomen", "thorax", "abnormal"]
    assert groups["abdomen"]["dice"] == pytest.approx(0.6) and groups["abdomen"]["nsd"] == pytest.approx(0.55)
    assert groups["abnormal"]["dice"] == pytest.approx(0.4) and groups["abnormal"]["n_mod_labels"] == 1
    assert groups["thorax"]["nsd"] == pytest.approx(0.9)
    assert s["overall"]["dice"] == pytest.approx(0.65) and s["overall"]["nsd"] == pytest.approx(0.575)
    assert s["overall"]["n_mod_labels"] == 4


def test_nnunet_nan_is_excluded_at_every_level():
    rows = [
        row("A", "c1", "liver", "abdomen", math.nan, math.nan),
        row("A", "c2", "liver", "abdomen", 0.8, 0.6),
        row("A", "c1", "spleen", "abdomen", math.nan, math.nan),
    ]
    agg = aggregate(rows)
    labels = by(agg["per_label"], "label")
    assert labels["liver"]["dice"] == pytest.approx(0.8) and math.isnan(labels["spleen"]["dice"])
    assert agg["overall"]["dice"] == pytest.approx(0.8) and agg["overall"]["nsd"] == pytest.approx(0.6)
    s = summarise(rows, "nnunet", 1.0, "original")
    assert by(s["per_label"], "label")["spleen"]["dice"] is None
    json.dumps(s, allow_nan=False)


def test_inconsistent_group_is_an_error():
    rows = [row("A", "c1", "liver", "abdomen", 1, 1), row("B", "c1", "liver", "thorax", 1, 1)]
    with pytest.raises(ValueError, match="group"):
        aggregate(rows)


def test_csv_round_trip(tmp_path):
    rows = [*deduplicate(ROWS), row("D", "c9", "kidney", "abdomen", math.nan, math.nan, tolerance_mm="3.0")]
    path = tmp_path / "out" / "per_case.csv"
    write_per_case_csv(rows, path)
    back = read_per_case_csv(path)
    assert [p.name for p in path.parent.iterdir()] == ["per_case.csv"]
    assert len(back) == len(rows)
    for a, b in zip(rows[:-1], back[:-1]):
        assert b == {**a, "tolerance_mm": ""}
    assert math.isnan(back[-1]["dice"]) and back[-1]["tolerance_mm"] == "3.0"
    assert isinstance(back[0]["tp"], int) and isinstance(back[0]["nsd"], float)


def test_summary_json_states_the_settings(tmp_path):
    s = summarise(ROWS, "sat", 1.0, "preprocessed", tolerance_overrides={"liver": 5})
    write_summary_json(s, tmp_path / "summary.json")
    loaded = json.loads((tmp_path / "summary.json").read_text())
    assert loaded == s
    assert (loaded["empty_rule"], loaded["nsd_tolerance_mm"], loaded["space"]) == ("sat", 1.0, "preprocessed")
    assert loaded["nsd_tolerance_overrides_mm"] == {"liver": 5.0}


def test_markdown_states_rules_and_compares():
    mine = summarise(ROWS, "sat", 1.0, "preprocessed")
    text = render_markdown(mine)
    assert "empty-mask rule sat" in text and "NSD tolerance 1 mm" in text and "space preprocessed" in text
    assert "| abnormal | 1 | 0.4000 | 0.3000 |" in text and "| All | 4 | 0.6500 | 0.5750 |" in text
    assert "Comparison" not in text
    other = summarise([{**r, "dice": r["dice"] / 2} for r in ROWS[:4]], "nnunet", 1.0, "preprocessed")
    text = render_markdown(
        mine, compare=other, names=("lorkd", "teacher"), param_counts={"lorkd": 67_315_458}
    )
    assert "## Comparison per region: lorkd vs teacher" in text
    assert "Settings differ" in text and "empty-mask rule nnunet" in text
    assert "| group | Dice lorkd | Dice teacher | ΔDice | NSD lorkd | NSD teacher | ΔNSD |" in text
    assert "| abnormal | 0.4000 | 0.2000 | +0.2000 | 0.3000 | 0.3000 | +0.0000 |" in text
    assert "| thorax | 1.0000 | – | – | 0.9000 | – | – |" in text
    assert "Parameters: lorkd 67,315,458 (67.32 M)" in text and "Parameters: teacher –" in text


def test_png_is_written(tmp_path):
    s = summarise(ROWS, "sat", 1.0, "preprocessed")
    for compare in (None, summarise(ROWS[:4], "sat", 1.0, "preprocessed")):
        path = tmp_path / f"dice_{compare is None}.png"
        plot_dice_by_region(s, path, compare=compare, names=("lorkd", "teacher"))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dice_False.png", "dice_True.png"]
