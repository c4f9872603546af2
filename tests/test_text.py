import pytest
import torch

from lorkd.models.text import TextEncoder
from lorkd.prompts import LanguageModel, PromptBank


@pytest.fixture(scope="module")
def minilm() -> LanguageModel:
    return LanguageModel()


def test_sat_tokenisation_wraps_the_bare_terminology(minilm):
    texts = ["liver tumor", "spleen", "inferior vena cava"]
    ids, mask = minilm.tokenize(texts)
    tok = minilm._tokenizer
    for row, text in zip(ids.tolist(), texts):
        expected = tok.convert_tokens_to_ids(["[CLS]", *tok.tokenize(text), "[SEP]"])
        assert row == expected + [0] * (ids.shape[1] - len(expected))
    assert torch.equal(mask, ids > 0)


def test_prompt_bank_encodes_each_prompt_once_and_reloads_from_disk(minilm, tmp_path):
    head = TextEncoder(minilm, query_dim=32, proj_hidden=48)
    bank = PromptBank(head, cache_dir=tmp_path)
    calls = minilm.calls
    q1 = bank.queries(["Liver", "spleen", "liver"], "ct")
    q2 = bank.queries(["spleen", "aorta"], ["ct", "mri"])
    bank.queries(["aorta", "LIVER "], "pet")
    assert minilm.calls == calls + 2  # one pass for {liver, spleen}, one for {aorta}
    assert q1.shape == (3, 32)
    torch.testing.assert_close(q1[0], q1[2])
    torch.testing.assert_close(q1[1], q2[0])
    assert not torch.allclose(q2[1], bank.queries(["aorta"], "ct")[0])  # modality embedding differs

    fresh = PromptBank(TextEncoder(minilm, query_dim=32, proj_hidden=48), cache_dir=tmp_path)
    assert set(fresh.embeddings) == {"liver", "spleen", "aorta"}
    fresh.text_embeddings(["liver", "aorta"])
    assert minilm.calls == calls + 2  # served from disk
    torch.testing.assert_close(fresh.embeddings["liver"], bank.embeddings["liver"])


def test_prompt_bank_round_trips_through_a_checkpoint_without_the_language_model(minilm):
    bank = PromptBank(TextEncoder(minilm, query_dim=16, proj_hidden=16))
    expected = bank.queries(["liver", "heart"], "ct")
    state = bank.state_dict()
    head = TextEncoder(None, hidden_dim=minilm.hidden_size, query_dim=16, proj_hidden=16)
    head.load_state_dict(bank.text_encoder.state_dict())
    restored = PromptBank(head)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.queries(["heart", "liver"], "ct"), expected[[1, 0]])
    with pytest.raises(KeyError, match="no language model"):
        restored.queries(["kidney"], "ct")


def test_prompt_bank_refuses_a_bank_from_another_language_model(minilm):
    bank = PromptBank(TextEncoder(minilm, query_dim=16, proj_hidden=16))
    with pytest.raises(ValueError, match="same language model"):
        bank.load_state_dict({"fingerprint": "0" * 16, "labels": [], "embeddings": torch.zeros(0)})


def test_memoised_queries_follow_head_updates(minilm):
    head = TextEncoder(minilm, query_dim=16, proj_hidden=16).requires_grad_(False)
    bank = PromptBank(head)
    before = bank.queries(["liver"], "ct")
    with torch.no_grad():
        head.modality_embed.weight.add_(1.0)
    after = bank.queries(["liver"], "ct")
    torch.testing.assert_close(after, before + 1.0)


def test_trainable_head_gets_gradients(minilm):
    head = TextEncoder(minilm, query_dim=16, proj_hidden=16)
    bank = PromptBank(head)
    bank.queries(["liver", "heart"], "mri").sum().backward()
    assert head.modality_embed.weight.grad[1].abs().sum() > 0
    assert head.modality_embed.weight.grad[0].abs().sum() == 0


DEMO_LABELS = {
    "ct": ["liver", "spleen", "left kidney", "right kidney", "aorta", "left lung", "right lung", "heart", "pulmonary artery"],
    "mri": ["lateral ventricle", "grey matter", "white matter"],
}


@pytest.mark.parametrize("query_dim", [64, 768])
def test_fresh_head_gives_distinct_labels_distinct_queries(minilm, query_dim):
    """A text head trained from scratch must tell labels apart from step 0: with nn.Embedding's default
    init the modality term dominated and every CT prompt had cosine 1.000 to every other."""
    torch.manual_seed(0)
    bank = PromptBank(TextEncoder(minilm, query_dim=query_dim, proj_hidden=query_dim))
    for modality, labels in DEMO_LABELS.items():
        q = torch.nn.functional.normalize(bank.queries(labels, modality), dim=-1)
        off = (q @ q.T)[~torch.eye(len(labels), dtype=torch.bool)]
        assert off.max() < 0.98, f"{modality}: max cosine {off.max():.4f} between distinct labels"
