"""SAT's text head: projection of a pooled language-model embedding to query space plus a modality embedding.

SAT encodes a prompt as ``[CLS] <bare lower-cased terminology> [SEP]``, mean-pools the last hidden
state, projects it (Linear-GELU-Linear) and adds a learned modality embedding (ct=0, mri=1, us=2, pet=3).
The frozen language model and the cache of its embeddings (the PromptBank) are in :mod:`lorkd.prompts`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TextEncoder(nn.Module):
    """SAT's knowledge head: ``projection_layer`` (Linear-GELU-Linear) + ``modality_embed`` (4 codes).

    The (frozen) language model (a :class:`lorkd.prompts.LanguageModel`, or None when a prompt bank holds every
    prompt) is held beside the module, not inside its ``state_dict``.
    """

    def __init__(
        self,
        language_model: Any | None = None,
        hidden_dim: int | None = None,
        query_dim: int = 768,
        proj_hidden: int = 768,
        num_modalities: int = 4,
    ) -> None:
        super().__init__()
        if hidden_dim is None:
            if language_model is None:
                raise ValueError("give hidden_dim or a language_model")
            hidden_dim = language_model.hidden_size
        self.language_model = language_model
        self.hidden_dim = hidden_dim
        self.query_dim = query_dim
        self.projection_layer = nn.Sequential(
            nn.Linear(hidden_dim, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, query_dim)
        )
        self.modality_embed = nn.Embedding(num_modalities, query_dim)
        # small at initialisation (norm ~0.1, the projection's output ~0.8): a fresh head's queries then
        # differ per label from step 0 (nn.Embedding's N(0, 1) init is ~10x the projection's output, which
        # made every prompt of a modality one query); official SAT text heads overwrite it when loaded
        nn.init.normal_(self.modality_embed.weight, std=0.1 / query_dim**0.5)

    @torch.no_grad()
    def spread_labels(self, text_embeddings: torch.Tensor) -> int:
        """Initialise the projection's first layer to whiten ``text_embeddings`` (N, hidden): the labels' own
        principal directions, centred and scaled to unit variance, fill its first rows (the rest keep their
        random init). A fresh head then starts with distinct queries even for prompts a general language
        model embeds almost alike (MiniLM: "left lung" / "right lung" cosine 0.92, after a random projection
        0.97; after this one about 0.6). Returns the number of rows set."""
        first = self.projection_layer[0]
        emb = text_embeddings.to(first.weight)
        mean = emb.mean(0)
        _, singular, directions = torch.linalg.svd(emb - mean, full_matrices=False)
        rank = int((singular > 1e-4 * singular[0]).sum()) if len(singular) else 0
        rank = min(rank, first.out_features)
        if rank == 0:
            return 0
        weight = directions[:rank] / singular[:rank, None] * len(emb) ** 0.5
        first.weight[:rank] = weight
        first.bias[:rank] = -(weight @ mean)
        return rank

    def forward(self, text_embeddings: torch.Tensor, modality_codes: torch.Tensor) -> torch.Tensor:
        """(N, hidden) pooled text embeddings + (N,) modality codes -> (N, query_dim) queries."""
        return self.projection_layer(text_embeddings) + self.modality_embed(modality_codes)
