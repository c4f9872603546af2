"""LoRKDModule: decompose a frozen SAT teacher into a student with per-region low-rank experts.

loss = Dice + BCE (labels) + λ·KD(teacher logits, per query, temperature T) [+ μ·MSE(fused latents)].
Teacher and text side are frozen and share one PromptBank; each sample runs its region's expert.
The teacher's weights are not stored in LoRKD checkpoints, only its path and fingerprint.

Fine-tuning one expert (``finetune_region``, ``experiment=finetune``): only that region's LoRA factors train;
the shared base, query decoder, heads, text side and every other expert stay frozen, so every other
region's outputs stay bit-identical. A new label's query is the frozen text head's output for its text prompt,
trainable with ``learn_queries`` (below). ``kd_labels="teacher"`` distils only labels the teacher knows. With
``lambda_lwf > 0`` the expert also distils, on the labels it was trained on (``lwf_labels``), its own outputs
before fine-tuning (a frozen copy of the starting student; Learning without Forgetting). With ``learn_queries`` a
label the starting checkpoint was not trained on gets a trainable query (started at the text head's), saved in
the prompt bank (``PromptBank.learned``): the new label need not move the features the old labels read.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorkd.checkpoints import schema
from lorkd.checkpoints.build import add_experts
from lorkd.checkpoints.key_report import KeyReport, load_mapped
from lorkd.checkpoints.loading import LoadedModel
from lorkd.checkpoints.schema import CheckpointMeta, ExpertsSpec, TeacherSource
from lorkd.experts import base_parameter_count, expert_parameter_counts, forward_routed
from lorkd.experts.routed import check_mixed_batch
from lorkd.losses import distillation_loss, segmentation_loss
from lorkd.models.sat import SAT
from lorkd.modules.base import PromptedSegmentationModule
from lorkd.regions import RegionMap, mod_label, normalize_label

log = logging.getLogger(__name__)

STUDENT_INITS = ("auto", "teacher", "checkpoint", "scratch")
KD_LABELS = ("all", "teacher")


def is_expert_key(name: str, region: str) -> bool:
    """Whether a student parameter or state key is one of ``region``'s LoRA factors."""
    return ".lora_" in name and f".{region}." in f"{name}."


def freeze_all_but_expert(student: SAT, region: str) -> list[str]:
    """Freeze every parameter of ``student`` except ``region``'s LoRA factors; their names (none: an error)."""
    trainable = []
    for name, p in student.named_parameters():
        own = is_expert_key(name, region)
        p.requires_grad_(own)
        if own:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"finetune_region={region!r}: the student has no expert of that name")
    return trainable


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class LoRKDModule(PromptedSegmentationModule):
    checkpoint_kind = "lorkd"

    def __init__(
        self,
        teacher: LoadedModel,
        student: SAT,
        experts: ExpertsSpec,
        optimizer: Callable[..., torch.optim.Optimizer],
        region_map: RegionMap,
        student_init: str = "auto",
        student_state: Mapping[str, torch.Tensor] | None = None,
        lambda_kd: float = 0.1,
        temperature: float = 1.0,
        kd_mode: str = "sigmoid",
        feature_kd_weight: float = 0.0,
        warmup_steps: int = 5000,
        total_steps: int = 100000,
        prompt_cache_dir: str | Path | None = None,
        mixed_batch: str = "auto",
        finetune_region: str | None = None,
        kd_labels: str = "all",
        lambda_lwf: float = 0.0,
        lwf_labels: Collection[str] = (),
        new_region_rank: int | None = None,
        learn_queries: bool = False,
        learned_queries: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``teacher``: the SAT teacher with its text side and file fingerprint (``lorkd.checkpoints.loading.load_teacher``);
        ``student``: the plain student SAT, which gets ``experts`` here; ``student_state``: the student (base and
        experts) to start from with ``student_init="checkpoint"`` (``lorkd.checkpoints.loading.read_student_state``);
        ``finetune_region``: train that expert alone (module docstring); ``kd_labels``: ``all`` or ``teacher`` (only
        labels in the teacher's prompt bank, or in the region map as given when the teacher has no bank);
        ``lambda_lwf``, ``lwf_labels``: with ``finetune_region``, the weight of the distillation from the expert as it
        was before fine-tuning, on those labels (the starting checkpoint's, ``read_prompt_labels``) in that region;
        ``new_region_rank``: ``finetune_region`` is a brand-new expert of that rank (in ``experts``, absent from
        ``student_state``: it starts as peft initialises it, B = 0, i.e. the shared base's outputs);
        ``learn_queries``: a trainable query for each label of ``finetune_region`` in the training data that is not
        in ``lwf_labels`` (module docstring); ``learned_queries``: the starting checkpoint's (``read_learned_queries``)."""
        if not teacher.fingerprint:
            raise ValueError(f"teacher {teacher.source} has no file fingerprint (load it with load_teacher)")
        if list(experts.regions) != list(region_map.regions):
            raise ValueError(f"the experts are for regions {experts.regions}, the region map has {region_map.regions}")
        super().__init__(teacher.prompts.text_encoder, optimizer, warmup_steps, total_steps, prompt_cache_dir, region_map)
        if teacher.meta is not None:  # a SATModule checkpoint's prompt bank (official files carry none)
            self.prompts.load_state_dict(teacher.prompts.state_dict())
        self.text_encoder.requires_grad_(False)
        self.teacher = teacher.net.eval().requires_grad_(False)
        self.teacher_source = {"path": str(Path(teacher.source).resolve()), "fingerprint": teacher.fingerprint}
        if student.query_dim != self.teacher.query_dim:
            raise ValueError(f"student query dim {student.query_dim} != teacher query dim {self.teacher.query_dim}")
        self.student = student
        self.student_config = dict(student.config)
        self._init_student(student_init, student_state)
        self.experts_spec = experts
        add_experts(student, experts)
        new = self._new_expert_keys(finetune_region, new_region_rank, experts)
        if student_state is not None:
            load_mapped(self.student, student_state, KeyReport(source="the student_state checkpoint"), new)
        self.lambda_kd = float(lambda_kd)
        self.temperature = float(temperature)
        self.kd_mode = kd_mode
        self.feature_kd_weight = float(feature_kd_weight)
        self.mixed_batch = check_mixed_batch(mixed_batch)
        self.finetune_region = finetune_region
        if finetune_region is not None:
            if finetune_region not in experts.regions:
                raise ValueError(f"finetune_region={finetune_region!r} is none of the experts {list(experts.regions)}")
            freeze_all_but_expert(self.student, finetune_region)
        if kd_labels not in KD_LABELS:
            raise ValueError(f"kd_labels must be one of {KD_LABELS}, got {kd_labels!r}")
        known = set(teacher.prompts.embeddings) or {k.split("_", 1)[1] for k in region_map.label_region}
        self.teacher_labels: frozenset[str] | None = frozenset(known) if kd_labels == "teacher" else None
        self.lambda_lwf = float(lambda_lwf)
        own = {key.split("_", 1)[1] for key, region in region_map.label_region.items() if region == finetune_region}
        self.trained_labels = frozenset(normalize_label(label) for label in lwf_labels)
        self.lwf_labels = self.trained_labels & own
        self.learn_queries = bool(learn_queries)
        self.new_queries = torch.nn.ParameterDict()  # "i" -> the query of new_query_keys[i] (set up with the data)
        self.new_query_keys: list[str] = []
        self.prompts.set_learned(learned_queries or {})
        self.anchor: SAT | None = None  # the student before fine-tuning, frozen (not saved: rebuilt from student_state)
        if finetune_region is not None and self.lambda_lwf > 0 and self.lwf_labels:
            self.anchor = copy.deepcopy(self.student).eval().requires_grad_(False)

    # ---- construction ------------------------------------------------------------------------------
    def _new_expert_keys(self, region: str | None, rank: int | None, experts: ExpertsSpec) -> dict[str, str]:
        """The student keys of a brand-new expert (``new_region_rank``), each with why a checkpoint lacks it."""
        if rank is None:
            return {}
        if region is None or experts.ranks.get(region) != rank:
            raise ValueError(f"new_region_rank={rank} needs finetune_region to be the new expert of that rank in {experts.ranks}")
        why = f"the new region {region!r}'s adapter starts at B = 0 (the shared base's outputs)"
        return {key: why for key in self.student.state_dict() if is_expert_key(key, region)}

    def _init_student(self, how: str, state: Mapping[str, torch.Tensor] | None) -> None:
        """Copy the teacher's tensors into the plain student (``auto``, ``teacher``), or leave it (``scratch``,
        ``checkpoint``: ``state`` is loaded once the experts are on)."""
        if how not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {how!r}")
        if (how == "checkpoint") != (state is not None):
            raise ValueError(
                "student_init=checkpoint needs the checkpoint to start from (model.student_state.path=PATH)" if state is None
                else f"a student_state is given but student_init={how}; use student_init=checkpoint to start from it"
            )  # fmt: skip
        if how == "scratch" or how == "checkpoint":
            return
        source = self.teacher.state_dict()
        target = self.student.state_dict()
        same = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
        if how == "teacher":
            load_mapped(self.student, same, KeyReport(source="teacher -> student"))
            return
        with torch.no_grad():
            for k, v in same.items():
                target[k].copy_(v)
        log.info("student initialised from the teacher for %d/%d tensors (matching name and shape)", len(same), len(target))

    def setup(self, stage: str) -> None:
        """With ``learn_queries``, once the training data is known: the new labels' trainable queries."""
        if stage != "fit" or not self.learn_queries or self.finetune_region is None or self.new_query_keys:
            return
        keys = sorted({
            mod_label(case.modality, label) for case in self.trainer.datamodule.cases_of("train") for label in case.labels
            if label not in self.trained_labels and self.region_map.region_of(label, case.modality) == self.finetune_region
        })  # fmt: skip
        for key in keys:
            modality, label = key.split("_", 1)
            self.new_queries[str(len(self.new_query_keys))] = torch.nn.Parameter(self.prompts.queries([label], modality)[0].detach().clone())
            self.new_query_keys.append(key)
        if keys:
            log.info("a trainable query for each new label: %s", ", ".join(keys))

    def queries_for(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's queries, a new label's from its trainable query (``learn_queries``)."""
        queries = super().queries_for(batch)
        if not self.new_query_keys:
            return queries
        index = {key: str(i) for i, key in enumerate(self.new_query_keys)}
        queries = queries.clone()
        for b, (labels, modality) in enumerate(zip(batch["labels"], batch["modality"])):
            for q, label in enumerate(labels):
                name = index.get(mod_label(modality, label))
                if name is not None:
                    queries[b, q] = self.new_queries[name]
        return queries

    # ---- modes and forward -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout off, always
        if self.anchor is not None:
            self.anchor.eval()
        return self

    def forward(self, image: torch.Tensor, queries: torch.Tensor, region: torch.Tensor, return_aux: bool = False, net: SAT | None = None):
        """Student (or ``net``'s) logits with sample ``b`` routed to expert ``region[b]`` (``-1``: shared base only)."""
        net = self.student if net is None else net
        if queries.ndim == 2:  # one query set for the whole batch: cut per sample like the image
            queries = queries.expand(image.shape[0], *queries.shape)
        return forward_routed(
            lambda x, q: net(x, q, return_aux=return_aux),
            net.backbone, region, (image, queries), self.mixed_batch,
        )  # fmt: skip

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        queries = self.queries_for(batch)
        qmask = batch["query_mask"]
        with torch.no_grad():
            teacher = self.teacher(batch["image"], queries, return_aux=True)
        student = self(batch["image"], queries, batch["region"], return_aux=True)
        seg, parts = segmentation_loss(student.logits, batch["masks"], qmask)
        kd = distillation_loss(student.logits, teacher.logits, self.distilled(batch, qmask), self.temperature, self.kd_mode)
        loss = seg + self.lambda_kd * kd
        logs = {"train/seg_loss": seg.detach(), "train/kd_loss": kd.detach(), **{f"train/{k}": v for k, v in parts.items()}}
        if self.anchor is not None:
            with torch.no_grad():
                before = self(batch["image"], queries, batch["region"], net=self.anchor)
            lwf = distillation_loss(student.logits, before, self.of_labels(batch, qmask, self.lwf_labels), self.temperature, self.kd_mode)
            loss = loss + self.lambda_lwf * lwf
            logs["train/lwf_loss"] = lwf.detach()
        if self.feature_kd_weight > 0:
            feat = F.mse_loss(student.memory.float(), teacher.memory.float())
            loss = loss + self.feature_kd_weight * feat
            logs["train/feature_kd_loss"] = feat.detach()
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict(logs, batch_size=bs)
        return loss

    def distilled(self, batch: dict[str, Any], qmask: torch.Tensor) -> torch.Tensor:
        """The query mask of the distillation loss: every valid query, or (``kd_labels="teacher"``) those of known labels."""
        return qmask if self.teacher_labels is None else self.of_labels(batch, qmask, self.teacher_labels)

    @staticmethod
    def of_labels(batch: dict[str, Any], qmask: torch.Tensor, labels: frozenset[str]) -> torch.Tensor:
        """``qmask`` kept at the queries whose label is one of ``labels``."""
        known = torch.zeros_like(qmask)
        for b, names in enumerate(batch["labels"]):
            for q, label in enumerate(names):
                known[b, q] = label in labels
        return qmask * known

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        queries = self.queries_for(batch)
        self.validation_dice(batch, self(batch["image"], queries, batch["region"]), "dice")
        self.validation_dice(batch, self.teacher(batch["image"], queries), "dice_teacher")

    # ---- bookkeeping -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        experts = expert_parameter_counts(self.student.backbone)
        base = base_parameter_count(self.student)
        counts = {
            "teacher": count(self.teacher),
            "student_base": base,
            "experts_all": sum(experts.values()),
            "deployed_expert": base,  # an expert merged into W0 has exactly the base's size
        }
        counts.update({f"expert_{k}": v for k, v in experts.items()})
        return counts

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})
        if self.trainer.is_global_zero:
            ratio = counts["deployed_expert"] / counts["teacher"]
            log.info(
                "parameters: teacher %s | student base %s | all experts %s | one deployed expert %s (%.1f%% of the teacher)",
                f"{counts['teacher']:,}", f"{counts['student_base']:,}", f"{counts['experts_all']:,}",
                f"{counts['deployed_expert']:,}", 100 * ratio,
            )  # fmt: skip

    def checkpoint_metadata(self) -> CheckpointMeta:
        return replace(
            super().checkpoint_metadata(),
            teacher=TeacherSource(**self.teacher_source, net=dict(self.teacher.config)),
            net=self.student_config,
            experts=self.experts_spec,
            parameter_counts=self.parameter_counts(),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.prompts.set_learned({key: self.new_queries[str(i)] for i, key in enumerate(self.new_query_keys)})
        super().on_save_checkpoint(checkpoint)  # the new labels' queries travel in the prompt bank
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("teacher.", "anchor.", "new_queries."))]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = schema.read(checkpoint, "the checkpoint to resume")
        saved = meta.teacher if meta is not None else None
        if saved is not None and saved.fingerprint != self.teacher_source["fingerprint"]:
            raise ValueError(
                f"this checkpoint was distilled from teacher {saved.path} ({saved.fingerprint}), "
                f"but the configured teacher is {self.teacher_source['path']} ({self.teacher_source['fingerprint']})"
            )
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if self.anchor is not None:
            checkpoint["state_dict"].update({f"anchor.{k}": v for k, v in self.anchor.state_dict().items()})
        learned = (meta.prompt_bank if meta is not None else {}).get("learned", {})
        checkpoint["state_dict"].update({f"new_queries.{i}": learned[key] for i, key in enumerate(self.new_query_keys) if key in learned})
