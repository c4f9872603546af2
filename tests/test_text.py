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


def test_memoised_queries_are_per_modality():
    """A frozen head (and any head under no_grad, as in inference) memoises queries: ``liver`` for ct and for
    mri stay two queries, each the head's own output for its modality code, in any call order."""
    from lorkd.regions import modality_code

    torch.manual_seed(0)
    embedding = torch.randn(1, 16)
    for frozen in (True, False):
        head = TextEncoder(None, hidden_dim=16, query_dim=8, proj_hidden=8).requires_grad_(not frozen)
        banks = [PromptBank(head), PromptBank(head)]
        for bank in banks:
            bank.load_state_dict({"fingerprint": None, "labels": ["liver"], "embeddings": embedding})
        with torch.no_grad():
            uncached = {m: head(embedding, torch.tensor([modality_code(m)]))[0] for m in ("ct", "mri")}
            first, second = banks[0].queries(["liver"], "ct")[0], banks[0].queries(["Liver"], "mri")[0]
            mixed = banks[1].queries(["liver", "liver", "liver"], ["mri", "ct", "mri"])  # one call, empty memo
        assert not torch.allclose(uncached["ct"], uncached["mri"])
        torch.testing.assert_close(first, uncached["ct"])
        torch.testing.assert_close(second, uncached["mri"])
        torch.testing.assert_close(mixed, torch.stack([uncached["mri"], uncached["ct"], uncached["mri"]]))


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


def _max_left_right_cosine(bank: PromptBank) -> float:
    with torch.no_grad():
        q = bank.queries(["left lung", "right lung", "left kidney", "right kidney"], "ct")
    q = torch.nn.functional.normalize(q, dim=-1)
    return max(float(q[0] @ q[1]), float(q[2] @ q[3]))


def test_spread_labels_starts_left_and_right_apart(minilm):
    """MiniLM embeds "left lung" / "right lung" at cosine 0.92 and a random projection brings them to ~0.97;
    trained from there the demo teacher kept them one query (0.99 after 150 steps). Whitening the first
    layer over the training labels starts every pair apart, left/right included."""
    torch.manual_seed(0)
    bank = PromptBank(TextEncoder(minilm, query_dim=64, proj_hidden=64))
    before = _max_left_right_cosine(bank)
    labels = DEMO_LABELS["ct"] + DEMO_LABELS["mri"]
    rows = bank.text_encoder.spread_labels(bank.text_embeddings(labels))
    after = _max_left_right_cosine(bank)
    assert rows == len(labels) - 1  # centred embeddings of 12 labels span 11 directions
    assert before > 0.9 and after < 0.8, (before, after)
    first = bank.text_encoder.projection_layer[0]
    with torch.no_grad():
        whitened = first(bank.text_embeddings(labels))[:, :rows]
    assert torch.allclose(whitened.mean(0), torch.zeros(rows), atol=1e-4)
    assert torch.allclose(whitened.T @ whitened / len(labels), torch.eye(rows), atol=1e-3)


def test_spread_labels_leaves_a_frozen_head_alone():
    from lorkd.models.sat import SAT
    from lorkd.modules.sat_module import SATModule

    net = SAT([8, 16], [1, 2], query_dim=16, proj_hidden=16, mask_hidden=8, decoder_layers=1, decoder_heads=2,
              decoder_ffn=16, latent_stride=2)
    with pytest.raises(ValueError, match="train_text_head"):
        SATModule(net, TextEncoder(hidden_dim=8, query_dim=16, proj_hidden=16), torch.optim.AdamW,
                  spread_label_queries=True)
