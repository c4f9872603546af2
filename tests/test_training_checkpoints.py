"""Training checkpoints: atomic in the run folder, ``last.ckpt`` at every ``every_n_train_steps``,
bit-exact resume on the CPU, and resume never unpickles code."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import demo_overrides, run_training

TEACHER = "experiment=demo_teacher"


def train(data: Path, out: Path, steps: int, *extra: str) -> Path:
    """A tiny demo-teacher run of ``steps`` steps into ``out`` (preprocessing cached next to it);
    returns its last.ckpt."""
    cache = f"paths.cache_dir={out.parent / 'cache'}"
    run_training([TEACHER, *demo_overrides(data, out, steps=steps), cache, *extra], out)
    return out / "checkpoints" / "last.ckpt"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoints_are_written_atomically_inside_the_run_folder(tiny_demo_data, tmp_path, monkeypatch):
    targets: list[object] = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        targets.append(f)
        if len(targets) == 3:  # killed half-way through the third checkpoint (step 3's last.ckpt)
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as handle:
                handle.truncate(100)
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    folder = out / "checkpoints"
    with pytest.raises(OSError, match="disk full"):
        train(tiny_demo_data, out, 3, "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.val_check_interval=3")
    # every checkpoint went through a temporary file in the run's own checkpoint folder
    assert all(isinstance(t, (str, Path)) for t in targets), targets
    assert {Path(t).parent for t in targets} == {folder} and all(Path(t).name.startswith(".tmp-") for t in targets)
    # the interrupted write left neither a temporary file nor a damaged last.ckpt
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert load(folder / "last.ckpt")["global_step"] == 2


def test_last_checkpoint_follows_every_n_train_steps_before_the_first_validation(
    tiny_demo_data, tmp_path, monkeypatch
):
    saved: list[tuple[str, int]] = []
    real = pl.Trainer.save_checkpoint

    def record(self, filepath, *args, **kwargs):
        saved.append((Path(filepath).name, self.global_step))
        return real(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", record)
    last = train(tiny_demo_data, tmp_path / "run", 3, "callbacks.model_checkpoint.every_n_train_steps=1")
    assert sorted({step for name, step in saved if name == "last.ckpt"}) == [1, 2, 3]
    assert load(last)["global_step"] == 3
    assert any(name.startswith("step_") for name, _ in saved)  # the best-by-val/dice checkpoint is still kept


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load(a)["state_dict"], load(b)["state_dict"]
    assert sa.keys() == sb.keys()
    differ = {k: float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if not torch.equal(sa[k], sb[k])}
    assert not differ, f"{len(differ)} tensors differ, largest {max(differ.values()):.3g}"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="plain"),
        pytest.param(("model.net.dropout=0.2", "data.num_workers=1"), id="dropout-workers", marks=pytest.mark.slow),
    ],
)
def test_killed_and_resumed_run_equals_a_straight_run_bit_for_bit(tiny_demo_data, tmp_path, extra):
    # 6 samples per epoch at batch 2: 3 steps an epoch. Killed at step 2 (mid-epoch) or 3 (end of
    # the epoch), the resumed run crosses into the next epoch.
    extra = ("data.samples_per_epoch=6", *extra)
    straight = train(tiny_demo_data, tmp_path / "straight", 4, *extra)
    for kill in (2, 3):
        killed = train(tiny_demo_data, tmp_path / f"killed{kill}", kill, *extra)
        resume = (*extra, "trainer.max_steps=4", f"ckpt_path={killed}")
        resumed = train(tiny_demo_data, tmp_path / f"resumed{kill}", kill, *resume)
        assert load(resumed)["global_step"] == load(straight)["global_step"] == 4
        _assert_same_weights(straight, resumed)


class _Payload:
    """Unpickling this object creates ``marker`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_demo_data, tmp_path, monkeypatch):
    good = train(tiny_demo_data, tmp_path / "run", 1)
    marker = tmp_path / "pwned"
    evil = load(good)
    evil["payload"] = _Payload(marker)
    bad = tmp_path / "evil.ckpt"
    torch.save(evil, bad)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match=r"evil\.ckpt.*(unsafe|weights_only)") as error:
        train(tiny_demo_data, tmp_path / "resumed", 1, "trainer.max_steps=2", f"ckpt_path={bad}")
    assert not marker.exists(), "the checkpoint's code ran"
    assert "Traceback" not in str(error.value).splitlines()[0]
