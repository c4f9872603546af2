import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lorkd.utils import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
_DATA = "data.train_manifest=/x/train.jsonl"
_TEXT = ["text_encoder.language_model_path=/x/BioLORD", "text_encoder.checkpoint=/x/text_encoder.pth", _DATA]
REQUIRED = {  # values an experiment leaves to the user (???)
    "nano": ["teacher.checkpoint=/x/SAT_Nano.pth", *_TEXT],
    "pro": ["teacher.checkpoint=/x/SAT_Pro.pth", *_TEXT],
    "teacher_nano": [_DATA],
    "teacher_pro": [_DATA],
    "finetune": ["teacher.checkpoint=/x/teacher.ckpt", "model.student_state.path=/x/lorkd.ckpt",
                 "model.finetune_region=abdomen", _DATA],
}


def test_every_experiment_is_listed():
    assert set(EXPERIMENTS) == {
        "demo", "demo_teacher", "finetune", "nano", "pro", "real_anatomy", "teacher_nano", "teacher_pro"
    }  # fmt: skip


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", *REQUIRED.get(experiment, [])])
    HydraConfig.instance().set_config(cfg)
    resolved = OmegaConf.to_container(cfg.model, resolve=True, throw_on_missing=True)
    assert resolved["_target_"].startswith("lorkd.modules.")
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    cpu = experiment.startswith(("demo", "real", "finetune"))  # finetune: one adapter, CPU-sized by default
    assert trainer["precision"] == ("32-true" if cpu else "bf16-mixed")


@pytest.mark.parametrize(
    "experiment,student,teacher",
    [("pro", "unet_nano", "SAT-Pro"), ("nano", "unet_student_nano", "SAT-Nano")],
)
def test_real_experiments_build_the_right_student(experiment, student, teacher):
    cfg = compose_config("train", [f"experiment={experiment}", *REQUIRED[experiment]])
    features = {"unet_nano": [64, 64, 128, 256, 512, 768], "unet_student_nano": [32, 64, 128, 256, 512]}[student]
    assert list(cfg.model.student.features) == features
    ranks = dict(cfg.model.experts.ranks)
    assert ranks["spine"] == (16 if experiment == "pro" else 8) and cfg.model.experts.decoder_rank_factor == 2
    with torch.device("meta"):
        net = instantiate(cfg.model.student, query_dim=768)
    expected = {"pro": 109_194_624, "nano": 57_235_872}[experiment]
    assert sum(p.numel() for p in net.parameters()) == expected


def test_cli_help_and_cfg_job():
    help_out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "experiment: demo, demo_teacher, finetune, nano, pro" in help_out.stdout
    job = subprocess.run(
        [sys.executable, "train.py", "experiment=pro", "teacher.checkpoint=/x.pth", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    assert "lorkd.modules.lorkd_module.LoRKDModule" in job.stdout and "checkpoint: /x.pth" in job.stdout


def test_demo_student_is_the_teacher_with_one_conv_per_stage():
    """The demo's experts share a student with <= 60% of the teacher's parameters whose every tensor has
    a teacher tensor of the same name and shape (student_init=auto starts it from the teacher)."""
    teacher_cfg = compose_config("train", ["experiment=demo_teacher"])
    cfg = compose_config("train", ["experiment=demo"])
    teacher = instantiate(teacher_cfg.model.net, query_dim=64)
    student = instantiate(cfg.model.student, query_dim=64)
    assert cfg.model.student_init == "auto" and student.config["mask_head_act"] == teacher.config["mask_head_act"]
    ts, ss = teacher.state_dict(), student.state_dict()
    assert all(k in ts and ts[k].shape == v.shape for k, v in ss.items())
    ratio = sum(v.numel() for v in ss.values()) / sum(v.numel() for v in ts.values())
    assert 0.45 < ratio <= 0.6
