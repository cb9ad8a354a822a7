"""The MG-3D pretext: every part's shape, the masks (only masked tokens and voxels count), sentence matching by hand,
the gated fusion, gathered CML and DFA over two processes, training steps, configuration errors and the picture."""

from __future__ import annotations

import math

import pytest
from conftest import on_gloo_ranks
import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode

from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.networks.fusion import CrossAttentionFusion, GatedCrossLayer, GatedFusion
from voco.networks.text import (IGNORE_INDEX, ReportTokenizer, SentenceTokens, SmallTextEncoder, tokenize_sentences,
                                whole_word_mask, with_mask_token)
from voco.pretext.mg3d import (MG3DPretext, masked_reconstruction_loss, masked_token_loss, save_views_picture,
                               sentence_matching_loss, sentence_means, window_mask)

REPORTS = ["No focal liver lesion. Kidneys are normal.", "Large hypodense liver lesion in segment 7.",
           "Small left pleural effusion. No liver lesion.", "Bilateral pleural effusion and ascites."]
PARTS = {"loss/mlm", "loss/sfr", "loss/mim", "loss/cml", "loss/dfa", "loss/ssm"}
REFERENCE = dict(fusion="reference", mim_guidance="tokens", cml_pairing="reference", sfr_target="reference",
                 sentence_image_features="reference", ssm_similarity="reference", ssm_average="reference",
                 detach_sentences=True)


def small_text_encoder() -> SmallTextEncoder:
    vocabulary = with_mask_token(ReportTokenizer.from_reports(REPORTS).vocabulary)
    return SmallTextEncoder(vocabulary, width=32, depth=1, num_heads=4, max_length=32)


def small_pretext(backbone=None, **kwargs) -> MG3DPretext:
    """A two-block tiny ViT on 16 x 16 x 8 scans (2 x 2 x 2 tokens), D = 32, MIM windows of 4^3 voxels."""
    torch.manual_seed(0)
    backbone = backbone or build_backbone("vit", "tiny", input_size=(16, 16, 8), patch_size=(8, 8, 4), depth=2)
    settings = dict(fusion_dim=32, embedding_dim=16, num_heads=4, mim_window_size=4)
    return MG3DPretext(backbone, small_text_encoder(), **{**settings, **kwargs})


def study_batch(count: int = 4, scans: int = 2, seed: int = 0) -> dict:
    """Random studies in [0, 1]; the last scan of study 0 is padding."""
    images = torch.rand(count, scans, 1, 16, 16, 8, generator=torch.Generator().manual_seed(seed))
    scan_mask = torch.ones(count, scans, dtype=torch.bool)
    scan_mask[0, -1] = scans == 1
    return {"image": images, "scan_mask": scan_mask, "report": REPORTS[:count]}


# --------------------------------------------------------------------------------------------------
# The pretext: parts, weights, gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switches", [{}, REFERENCE], ids=["fixes", "reference"])
def test_every_part_is_a_scalar_and_the_loss_their_weighted_sum(switches):
    pretext = small_pretext(**switches)
    output = pretext(study_batch())
    assert set(output) == {"loss"} | PARTS
    assert all(value.ndim == 0 and torch.isfinite(value) for value in output.values())
    assert all(not value.requires_grad for key, value in output.items() if key != "loss")
    weights = {"mlm": 1.0, "sfr": 0.1, "mim": 1.0, "cml": 0.1, "dfa": 0.1, "ssm": 0.1}  # MG-3D's
    torch.testing.assert_close(output["loss"].detach(), sum(w * output[f"loss/{part}"] for part, w in weights.items()))
    output["loss"].backward()
    unused = [name for name, parameter in pretext.named_parameters() if parameter.grad is None]
    assert unused == []  # only what a part reads is built: DDP needs no search for unused parameters (ViT, attention)
    assert pretext.backbone.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    assert pretext.text_encoder.token_embedding.weight.grad.abs().sum() > 0
    assert isinstance(pretext.token_fusion, GatedFusion if switches else CrossAttentionFusion)
    assert pretext.find_unused_parameters == bool(switches)


def test_a_weight_of_zero_drops_its_part_and_its_heads():
    pretext = small_pretext(dfa_weight=0.0, ssm_weight=0, sfr_weight=0.0, mlm_weight=2.0)
    output = pretext(study_batch())
    assert set(output) == {"loss", "loss/mlm", "loss/mim", "loss/cml"}
    torch.testing.assert_close(output["loss"].detach(),
                               2 * output["loss/mlm"] + output["loss/mim"] + 0.1 * output["loss/cml"])
    assert not any(hasattr(pretext, name) for name in ("sentence_head", "aggregation_gates", "sfr_head"))
    only_mim = small_pretext(mlm_weight=0, sfr_weight=0, cml_weight=0, dfa_weight=0, ssm_weight=0)
    assert set(only_mim(study_batch(count=1))) == {"loss", "loss/mim"}  # one study: no negatives needed
    assert only_mim.token_fusion is None and not hasattr(only_mim, "mlm_transform")


def test_swin_backbone_deepest_map_becomes_tokens():
    swin = build_backbone("swin", "tiny", window_size=2)  # 32 x 32 x 64 -> a 1 x 1 x 2 map of 192 channels
    pretext = small_pretext(swin, mim_window_size=8, sfr_weight=0, dfa_weight=0)
    images = torch.rand(2, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))
    tokens, mask, grid = pretext.image_tokens(images[:, None], None)
    assert tokens.shape == (2, 2, 32) and mask is None and grid == (1, 1, 2)
    output = pretext({"image": images, "report": REPORTS[:2]})
    assert set(output) == {"loss", "loss/mlm", "loss/mim", "loss/cml", "loss/ssm"} and torch.isfinite(output["loss"])
    assert pretext.find_unused_parameters  # the Swin encoder's shallow blocks are not read


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    """8 AdamW steps on four studies (new word and window masks every step), the loss measured before and after with
    the same masks: the total falls (measured: 0.97-0.98 of it for five seeds), MIM and SFR clearly (0.63 -> 0.43,
    1.2 -> 0.36); MLM with one masked word per report and CML / DFA at ln 4 move little in 8 steps."""
    pretext = small_pretext()
    batch = study_batch(scans=1)

    def with_fixed_masks() -> dict:
        pretext.generator.manual_seed(123)
        with torch.no_grad(), eval_mode(pretext):
            return pretext(batch)

    before = with_fixed_masks()
    optimizer = torch.optim.AdamW(pretext.parameters(), lr=3e-3)
    for _ in range(8):
        loss = pretext(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = with_fixed_masks()
    assert after["loss"] < before["loss"], (before, after)
    assert after["loss/mim"] < 0.85 * before["loss/mim"] and after["loss/sfr"] < 0.6 * before["loss/sfr"]


# --------------------------------------------------------------------------------------------------
# Masks and losses
# --------------------------------------------------------------------------------------------------
def test_masked_token_loss_counts_only_the_masked_tokens():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2], labels[1, 0], labels[1, 4] = 3, 7, 1
    by_hand = sum(-F.log_softmax(logits[row, position], dim=-1)[label]
                  for row, position, label in [(0, 2, 3), (1, 0, 7), (1, 4, 1)]) / 3
    torch.testing.assert_close(masked_token_loss(logits, labels), by_hand)
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = 100 * torch.randn(9, 11)
    torch.testing.assert_close(masked_token_loss(changed, labels), by_hand)


def test_whole_word_masking_takes_whole_words_and_its_share_of_the_tokens():
    encoder = small_text_encoder()
    tokens = tokenize_sentences(encoder, [["No focal liver lesion.", "Kidneys are normal."]] * 300)
    mask_id = encoder.special_token_ids["mask"]
    masked, labels = whole_word_mask(tokens, mask_id, encoder.vocabulary_size, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(dim=1) == round(0.15 * 9)).all()  # 9 words of one token each: 1 masked per report
    assert (tokens.word_index[chosen] >= 0).all()  # never [CLS], [SEP] or [PAD]
    torch.testing.assert_close(labels[chosen], tokens.token_ids[chosen])
    assert torch.equal(masked[~chosen], tokens.token_ids[~chosen])
    shares = [(masked[chosen] == mask_id).float().mean(), (masked[chosen] == tokens.token_ids[chosen]).float().mean()]
    assert abs(shares[0] - 0.8) < 0.08 and 0.05 < shares[1] < 0.2  # 80 % [MASK], 10 % kept (+ random hits)

    # Words of several pieces are masked whole: (word 0: 2 pieces, word 1: 3 pieces, word 2: 1 piece).
    words = torch.tensor([[-1, 0, 0, 1, 1, 1, 2, -1]]).repeat(50, 1)
    pieces = SentenceTokens(torch.arange(8).repeat(50, 1), words >= -1, words.clamp(max=0), words)
    _, labels = whole_word_mask(pieces, 99, 100, 0.5, torch.Generator().manual_seed(1))  # budget: 3 of 6 pieces
    for row, label in zip(words, labels):
        for word in range(3):
            taken = label[row == word] != IGNORE_INDEX
            assert taken.all() or not taken.any()
        assert 1 <= int((label != IGNORE_INDEX).sum()) <= 3


def test_sentence_layout_and_sentence_means():
    encoder = small_text_encoder()
    tokens = tokenize_sentences(encoder, [["No focal liver lesion.", "Kidneys are normal."], ["Ascites."]])
    assert tokens.sentence_index.tolist() == [[-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1], [-1, 0, 0, -1] + [-1] * 7]
    assert tokens.attention_mask.sum(dim=1).tolist() == [11, 4]
    features = torch.arange(22.0).view(2, 11, 1)
    means, mask = sentence_means(features, tokens.sentence_index, 2)
    assert means[:, :, 0].tolist() == [[3.0, 7.5], [12.5, 0.0]] and mask.tolist() == [[True, True], [True, False]]


def test_mim_loss_counts_only_the_masked_voxels():
    voxel_mask = window_mask((8, 8, 8), 4, 0.5, torch.Generator().manual_seed(0))
    assert voxel_mask.shape == (1, 1, 8, 8, 8) and voxel_mask.float().mean() == 0.5
    windows = voxel_mask[0, 0].view(2, 4, 2, 4, 2, 4)  # every 4^3 window masked whole or not at all
    assert ((windows.sum(dim=(1, 3, 5)) == 0) | (windows.sum(dim=(1, 3, 5)) == 64)).all()
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.rand(3, 1, 8, 8, 8, generator=generator), torch.rand(3, 1, 8, 8, 8, generator=generator)
    scan_mask = torch.tensor([True, True, False])
    loss = masked_reconstruction_loss(prediction, target, voxel_mask, 0.5, scan_mask)
    masked = voxel_mask.expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(loss, (prediction[:2] - target[:2])[masked].square().mean())  # ratio 0.5 exactly
    changed = torch.where(voxel_mask, prediction, 5.0)  # unmasked voxels changed: same loss
    changed[2] = -3.0  # the padded scan: same loss
    torch.testing.assert_close(masked_reconstruction_loss(changed, target, voxel_mask, 0.5, scan_mask), loss)
    assert masked_reconstruction_loss(torch.where(voxel_mask, 5.0, prediction), target, voxel_mask, 0.5,
                                      scan_mask) > loss + 1
    with pytest.raises(ConfigError, match="mim_window_size"):
        window_mask((8, 8, 6), 4, 0.5)


# --------------------------------------------------------------------------------------------------
# Sentence-similarity matching by hand
# --------------------------------------------------------------------------------------------------
def test_sentence_matching_leaves_out_ambiguous_entries_and_a_pair_with_nothing_else():
    """Three studies of two sentences (study 2: one real sentence). Text cosines: study 0 vs 1: 1.0 (similar) and 0.0
    (dissimilar); study 0 vs 2: 0.75 and 0.66, all ambiguous, so the pair is left out; study 1 vs 2: 0.75
    (ambiguous) and 0.0 (dissimilar). Study 2's padded sentence would be similar to study 0's first."""
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    halfway = torch.tensor([0.75, math.sqrt(1 - 0.75 ** 2), 0.0], dtype=torch.float64)
    text = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e3]), torch.stack([halfway, e1])])
    sentence_mask = torch.tensor([[True, True], [True, True], [True, False]])
    images = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cosine = F.normalize(images, dim=-1)
    target = F.normalize(text, dim=-1)

    def pair_errors(i, j):  # (error, verdict) per real entry
        entries = []
        for s in range(2):
            for t in range(2):
                if sentence_mask[i, s] and sentence_mask[j, t]:
                    g, p = float(target[i, s] @ target[j, t]), float(cosine[i, s] @ cosine[j, t])
                    entries.append((abs(p - g), True) if g >= 0.9 else (abs(p), True) if g <= 0.6 else (0.0, False))
        return entries

    pairs = {pair: pair_errors(*pair) for pair in [(0, 1), (0, 2), (1, 2)]}
    assert not any(kept for _, kept in pairs[(0, 2)])  # the all-ambiguous pair
    kept = [sum(e for e, k in pairs[p] if k) / sum(k for _, k in pairs[p]) for p in [(0, 1), (1, 2)]]
    loss = sentence_matching_loss(images, text, sentence_mask)
    assert loss.item() == pytest.approx(sum(kept) / 2)
    every = [sum(e for e, _ in entries) / len(entries) for entries in pairs.values()]
    assert sentence_matching_loss(images, text, sentence_mask, average="reference").item() == \
        pytest.approx(sum(every) / 3)

    # Every pair ambiguous (text cosines 0.8, 0.8, 0.64): loss 0, and backward still runs.
    alike = images[:, :1].clone().requires_grad_(True)
    ambiguous = torch.tensor([[[1.0, 0.0, 0.0]], [[0.8, 0.6, 0.0]], [[0.8, 0.0, 0.6]]], dtype=torch.float64)
    loss = sentence_matching_loss(alike, ambiguous, torch.ones(3, 1).bool())
    loss.backward()
    assert loss.item() == 0.0 and alike.grad.abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------
def test_gated_fusion_scales_each_token_own_value_by_a_gate_over_the_other_side():
    torch.manual_seed(0)
    layer = GatedCrossLayer(8)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    b_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    a_out, b_out = layer(a, b, None, b_mask)
    gates = a_out / layer.value_a(a)  # one gate per token, the same for every channel
    torch.testing.assert_close(gates, gates[..., :1].expand_as(gates))
    assert ((gates > 0) & (gates < 1)).all()
    scores = torch.sigmoid(layer.query_a(a)[1] @ layer.key_b(b)[1, :2].T / math.sqrt(8))
    torch.testing.assert_close(gates[1, :, 0], scores.mean(dim=1))  # the mean over the real keys only
    padded = b.clone()
    padded[1, 2:] = 50.0
    torch.testing.assert_close(layer(a, padded, None, b_mask)[0], a_out)
    assert b_out.shape == (2, 5, 8)

    # Attention fusion: pads of the context change nothing; a side not asked for comes back unchanged.
    fusion = CrossAttentionFusion(8, num_heads=2, layers=2, update="a")
    fused, same = fusion(a, b, None, b_mask)
    torch.testing.assert_close(fusion(a, padded, None, b_mask)[0], fused)
    assert same is b and len(fusion.b_from_a) == 0


# --------------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------------
def _contrastive_parts(pretext, batch) -> list:
    output = pretext(batch)
    output["loss"].backward()
    return [output["loss/cml"], output["loss/dfa"], pretext.image_head[1].weight.grad,
            pretext.aggregation_gates[0].value.weight.grad]


def _gathered_parts_worker(rank: int, world_size: int, batch: dict) -> list:
    """One of two gloo processes holding half of the studies."""
    rows = len(batch["report"]) // world_size
    half = {key: value[rank * rows:(rank + 1) * rows] for key, value in batch.items()}
    pretext = small_pretext(mlm_weight=0, sfr_weight=0, mim_weight=0, ssm_weight=0).eval()
    return _contrastive_parts(pretext, half)


def test_cml_and_dfa_over_two_processes_equal_the_single_process_losses():
    """Two gloo ranks with two studies each: the mean of the ranks' CML and DFA is the whole batch's, and the
    gradients averaged over ranks (as DDP does) are the whole batch's."""
    batch = study_batch(4)
    pretext = small_pretext(mlm_weight=0, sfr_weight=0, mim_weight=0, ssm_weight=0).eval()
    expected = _contrastive_parts(pretext, batch)
    by_rank = on_gloo_ranks(_gathered_parts_worker, batch)
    for index, value in enumerate(expected):
        torch.testing.assert_close((by_rank[0][index] + by_rank[1][index]) / 2, value, rtol=1e-4, atol=1e-6)
    assert by_rank[0][0] != by_rank[1][0]  # each rank's own anchors: the halves differ


# --------------------------------------------------------------------------------------------------
# Errors and the picture
# --------------------------------------------------------------------------------------------------
def test_configuration_and_batch_errors():
    with pytest.raises(ConfigError, match="MG-3D pretext needs a backbone.*the Linear does not"):
        small_pretext(torch.nn.Linear(2, 2))
    vit = build_backbone("vit", "tiny", input_size=(16, 16, 8), patch_size=(8, 8, 4), depth=1)
    unmaskable = SmallTextEncoder(ReportTokenizer.from_reports(REPORTS).vocabulary, width=32, depth=1, num_heads=4)
    with pytest.raises(ConfigError, match=r"no \[MASK\].*mask_token=True"):
        MG3DPretext(vit, unmaskable, fusion_dim=32, num_heads=4)
    MG3DPretext(vit, unmaskable, fusion_dim=32, num_heads=4, mlm_weight=0, sfr_weight=0)  # no MLM: no [MASK] needed
    with pytest.raises(ConfigError, match="token-level access.*lacks"):
        MG3DPretext(vit, torch.nn.Linear(2, 2), fusion_dim=32, num_heads=4)
    for kwargs, message in [({"fusion": "film"}, "unknown fusion"), ({"ssm_average": "all"}, "unknown ssm_average"),
                            ({"mim_weight": -1.0}, "loss weights"),
                            ({k: 0 for k in ("mlm_weight", "sfr_weight", "mim_weight", "cml_weight", "dfa_weight",
                                             "ssm_weight")}, "at least one"),
                            ({"mim_mask_ratio": 1.0}, "mim_mask_ratio"),
                            ({"dissimilar_threshold": 0.95}, "dissimilar_threshold")]:
        with pytest.raises(ConfigError, match=message):
            small_pretext(**kwargs)
    pretext = small_pretext()
    with pytest.raises(ConfigError, match="no words"):
        pretext({**study_batch(2), "report": ["Liver lesion.", "  "]})
    with pytest.raises(ConfigError, match="at least 2 studies"):
        pretext(study_batch(1))
    with pytest.raises(ConfigError, match="2 report texts"):
        pretext({**study_batch(2), "report": ["one report"]})


def test_views_and_their_picture(tmp_path):
    pretext = small_pretext().train()
    views = pretext.views(study_batch(2))
    assert pretext.training
    assert all(views[key].shape == (16, 16) for key in ("input", "masked", "mask", "reconstruction"))
    assert views["report"] == REPORTS[0] and views["mask"].dtype == torch.bool
    assert (views["masked"][views["mask"]] == 0).all()
    torch.testing.assert_close(views["reconstruction"][~views["mask"]], views["input"][~views["mask"]])
    assert len(views["masked_words"]) == len(views["predicted_words"]) >= 1
    assert all(isinstance(word, str) for word in views["masked_words"] + views["predicted_words"])
    path = save_views_picture(views, tmp_path / "views" / "mg3d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
