"""Text encoders for language-image pretraining: report tokenizer, small transformer, a local Hugging Face BERT."""

from __future__ import annotations

import socket
import sys

import pytest
import torch

from voco.errors import ConfigError, MissingDependencyError
from voco.networks.text import HuggingFaceTextEncoder, ReportTokenizer, SmallTextEncoder, build_text_encoder

REPORTS = ["No mass.", "Mass in the liver.", "Hypodense lesion in the liver, 3.5 cm."]
# The tiny BERT's WordPiece vocabulary: every word of the texts below is one piece.
BERT_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "mass", "in", "the", "liver", "lesion", "cm",
                   "3", ".", ","]


# --------------------------------------------------------------------------------------------------
# ReportTokenizer
# --------------------------------------------------------------------------------------------------
def test_vocabulary_is_ordered_by_count_then_alphabet_and_does_not_depend_on_report_order():
    tokenizer = ReportTokenizer.from_reports(REPORTS)
    # counts: . 3; in, liver, mass, the 2; then the words seen once, alphabetically
    assert tokenizer.vocabulary == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "in", "liver", "mass", "the", ",", "3.5",
                                    "cm", "hypodense", "lesion", "no"]
    assert ReportTokenizer.from_reports(reversed(REPORTS)).vocabulary == tokenizer.vocabulary
    assert ReportTokenizer.from_reports(REPORTS + [None, ""], max_size=7, min_count=2).vocabulary == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "in", "liver"]


def test_words_numbers_and_punctuation_are_tokens():
    assert ReportTokenizer([]).words("Lesion 3.5 cm (T2-hyperintense), seg. 4.") == \
        ["lesion", "3.5", "cm", "(", "t2", "-", "hyperintense", ")", ",", "seg", ".", "4", "."]
    assert ReportTokenizer([], lowercase=False).words("No Mass") == ["No", "Mass"]


def test_token_ids_special_tokens_unknown_words_padding_and_mask():
    tokenizer = ReportTokenizer(["no", "mass", "in", "the", "liver", "."])  # ids 4..9
    token_ids, attention_mask = tokenizer(["Mass in the spleen.", "No mass"])
    assert token_ids.dtype == torch.int64 and attention_mask.dtype == torch.bool
    assert token_ids.tolist() == [[2, 5, 6, 7, 1, 9, 3],  # [CLS] mass in the [UNK] . [SEP]
                                  [2, 4, 5, 3, 0, 0, 0]]  # [CLS] no mass [SEP] [PAD] ...
    assert attention_mask.tolist() == [[True] * 7, [True] * 4 + [False] * 3]


def test_truncation_keeps_the_first_words_and_sep_last():
    tokenizer = ReportTokenizer(["no", "mass", "in", "the", "liver", "."], max_length=5)
    token_ids, attention_mask = tokenizer(["No mass in the liver.", "No."])
    assert token_ids.shape == (2, 5)
    assert token_ids.tolist() == [[2, 4, 5, 6, 3], [2, 4, 9, 3, 0]]
    assert attention_mask.sum(dim=1).tolist() == [5, 4]


@pytest.mark.parametrize("build", [
    lambda: ReportTokenizer(["mass", "liver", "mass"]),  # a word twice
    lambda: ReportTokenizer(["mass"], max_length=1),  # no room for [CLS] and [SEP]
    lambda: ReportTokenizer.from_reports(REPORTS, max_size=4),  # only the special tokens
    lambda: ReportTokenizer.from_reports([None, ""]),  # no report text at all
    lambda: ReportTokenizer.from_reports(REPORTS, min_count=4),  # no word that frequent
    lambda: ReportTokenizer(["mass"])("No mass."),  # one string, not a batch
])
def test_tokenizer_rejects_unusable_settings(build):
    with pytest.raises(ConfigError):
        build()


# --------------------------------------------------------------------------------------------------
# SmallTextEncoder
# --------------------------------------------------------------------------------------------------
def small_encoder(**kwargs) -> SmallTextEncoder:
    torch.manual_seed(0)
    settings = {"width": 32, "depth": 2, "num_heads": 2, "max_length": 16, **kwargs}
    return SmallTextEncoder(ReportTokenizer.from_reports(REPORTS).vocabulary, **settings).eval()


def test_small_encoder_shape_and_padding_does_not_change_a_report():
    encoder = small_encoder()
    alone = encoder(["No mass."])
    batched = encoder(["No mass.", "Hypodense lesion in the liver, 3.5 cm. Mass in the liver."])
    assert alone.shape == (1, 32) and batched.shape == (2, 32)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # different reports, different embeddings
    # The mask is what keeps padding out: attending to the padding changes the embedding.
    token_ids, attention_mask = encoder.tokenizer(["No mass.", "Hypodense lesion in the liver, 3.5 cm."])
    attending_to_padding = encoder.encode_tokens(token_ids, torch.ones_like(attention_mask))[0, 0]
    assert not torch.allclose(attending_to_padding, alone[0], atol=1e-3)


def test_small_encoder_gradients_reach_every_parameter():
    encoder = small_encoder().train()
    embeddings = encoder(REPORTS)
    (embeddings * torch.randn_like(embeddings)).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_vocabulary_travels_in_a_weights_only_checkpoint(tmp_path):
    trained = small_encoder()
    torch.save(trained.state_dict(), tmp_path / "text.pt")
    state = torch.load(tmp_path / "text.pt", weights_only=True)
    other_words = [f"word{i}" for i in range(len(trained.tokenizer) - 4)]  # same size, other words
    restored = SmallTextEncoder(other_words, width=32, depth=2, num_heads=2, max_length=16).eval()
    assert restored.tokenizer.vocabulary != trained.tokenizer.vocabulary
    restored.load_state_dict(state)
    assert restored.tokenizer.vocabulary == trained.tokenizer.vocabulary
    torch.testing.assert_close(restored(REPORTS), trained(REPORTS))

    smaller = SmallTextEncoder(other_words[:-1], width=32, depth=2, num_heads=2, max_length=16)
    with pytest.raises(ConfigError, match="vocabulary_size"):
        smaller.load_state_dict(state)


def test_build_small_text_encoder_from_reports_and_its_errors():
    encoder = build_text_encoder("small", reports=iter(REPORTS), width=32, depth=1, num_heads=2, max_length=16,
                                 vocabulary_size=10)
    assert isinstance(encoder, SmallTextEncoder) and encoder.width == 32
    assert len(encoder.tokenizer) == 10 and encoder.token_embedding.num_embeddings == 10
    assert encoder.tokenizer.max_length == 16 and encoder.position_embedding.shape == (1, 16, 32)
    with pytest.raises(ConfigError, match="reports"):
        build_text_encoder("small")
    with pytest.raises(ConfigError, match="path"):
        build_text_encoder("huggingface")
    with pytest.raises(ConfigError, match="unknown text encoder"):
        build_text_encoder("gpt")


# --------------------------------------------------------------------------------------------------
# HuggingFaceTextEncoder on a tiny random BERT saved to a folder
# --------------------------------------------------------------------------------------------------
TEXTS = ["No mass in the liver.", "Lesion, 3 cm."]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        transformers = pytest.importorskip("transformers", reason="pip install 'voco[text]'")
        vocabulary_folder = tmp_path_factory.mktemp("vocabulary")
        (vocabulary_folder / "vocab.txt").write_text("\n".join(BERT_VOCABULARY) + "\n")
        tokenizer = transformers.BertTokenizerFast.from_pretrained(vocabulary_folder, local_files_only=True)
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=len(BERT_VOCABULARY), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
        folder = tmp_path_factory.mktemp("tiny_bert")
        transformers.BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        yield folder


@pytest.fixture()
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"the text encoder tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def raw_bert_states(folder, texts):
    """The last hidden states ``[B, L, width]`` and mask of the saved BERT, run directly by transformers."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).last_hidden_state, tokens["attention_mask"]


def test_cls_and_mean_pooling_match_the_raw_bert(bert_folder, offline):
    hidden, attention_mask = raw_bert_states(bert_folder, TEXTS)
    assert attention_mask.sum(dim=1).tolist() == [8, 7]  # every word is one piece; the second text is padded
    cls = HuggingFaceTextEncoder(bert_folder, pooling="cls", max_length=32).eval()
    mean = HuggingFaceTextEncoder(bert_folder, pooling="mean", max_length=32).eval()
    assert cls.width == 32
    with torch.no_grad():
        cls_embeddings, mean_embeddings = cls(TEXTS), mean(TEXTS)
    assert cls_embeddings.shape == mean_embeddings.shape == (2, 32)
    torch.testing.assert_close(cls_embeddings, hidden[:, 0])
    by_hand = torch.stack([hidden[0, :8].mean(dim=0), hidden[1, :7].mean(dim=0)])  # real tokens only
    torch.testing.assert_close(mean_embeddings, by_hand)


def test_long_texts_are_truncated_to_max_length(bert_folder, offline):
    encoder = HuggingFaceTextEncoder(bert_folder, max_length=8).eval()
    long_text = " ".join(["no mass in the liver ."] * 40)  # 240 pieces, beyond the 64 positions of the model
    with torch.no_grad():
        truncated, first_words = encoder([long_text, "no mass in the liver ."])  # [CLS] + 6 pieces + [SEP]
    torch.testing.assert_close(truncated, first_words)


def test_frozen_bert_trains_only_its_layer_norms_and_stays_in_eval_mode(bert_folder, offline):
    encoder = HuggingFaceTextEncoder(bert_folder, freeze=True, max_length=32).train()
    assert encoder.training and not any(module.training for module in encoder.model.modules())
    first, second = encoder(TEXTS), encoder(TEXTS)
    torch.testing.assert_close(first, second)  # hidden_dropout_prob is 0.1: equal only because dropout is off
    (first * torch.randn_like(first)).sum().backward()
    layer_norm_names = {f"model.{name}.{kind}" for name, module in encoder.model.named_modules()
                        if isinstance(module, torch.nn.LayerNorm) for kind in ("weight", "bias")}
    assert len(layer_norm_names) == 2 * (1 + 2 * 2)  # embeddings + attention and output norm of each layer
    for name, parameter in encoder.named_parameters():
        if name in layer_norm_names:
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_unfrozen_bert_trains_everything_in_train_mode(bert_folder, offline):
    encoder = build_text_encoder("huggingface", path=str(bert_folder), freeze=False, max_length=32).train()
    assert isinstance(encoder, HuggingFaceTextEncoder) and encoder.model.training
    assert all(parameter.requires_grad for parameter in encoder.parameters())
    embeddings = encoder(TEXTS)
    (embeddings * torch.randn_like(embeddings)).sum().backward()
    assert all(parameter.grad is not None for parameter in encoder.parameters())  # no unused pooler left for DDP


def test_unusable_bert_settings_raise_config_errors(bert_folder, tmp_path, offline):
    with pytest.raises(ConfigError, match="missing_model.*save_pretrained"):
        HuggingFaceTextEncoder(tmp_path / "missing_model")
    with pytest.raises(ConfigError, match="config.json"):
        HuggingFaceTextEncoder(tmp_path)  # a folder, but no model in it
    with pytest.raises(ConfigError, match="pooling"):
        HuggingFaceTextEncoder(bert_folder, pooling="max", max_length=32)
    with pytest.raises(ConfigError, match="64 positions"):
        HuggingFaceTextEncoder(bert_folder, max_length=128)


def test_missing_transformers_names_the_extra_to_install(bert_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'voco\[text\]'"):
        HuggingFaceTextEncoder(bert_folder, max_length=32)
