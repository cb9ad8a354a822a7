"""The language-image (CLIP / HLIP) pretext and its zero-shot evaluation: losses by hand, the temperature clamp,
gathered losses over two processes, padded scans, the metrics by hand, the training step and the views picture."""

from __future__ import annotations

import math

import pytest
from conftest import on_gloo_ranks
import torch
import torch.nn.functional as F

from voco.errors import ConfigError
from voco.networks import build_backbone
from voco.networks.text import ReportTokenizer, SmallTextEncoder
from voco.pretext.clip import (CLIPPretext, clip_loss, save_views_picture, sentence_matching_loss, siglip_loss,
                               study_images)
from voco.pretext.zero_shot import (DEFAULT_PROMPT_TEMPLATES, balanced_accuracy, evaluate_zero_shot, finding_phrase,
                                    prompt_pairs, recall_at_k, roc_auc, zero_shot_probabilities)

REPORTS = ["No focal liver lesion. Kidneys are normal.", "Large hypodense liver lesion in segment 7.",
           "Small left pleural effusion. No liver lesion.", "Bilateral pleural effusion and ascites."]
FINDINGS = ["liver_lesion", "pleural_effusion"]
LABELS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]])

# Three studies and their reports as unit vectors whose cosines are easy to read (rows of C = study . report):
#   C = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]
STUDIES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
PAIRED_REPORTS = torch.tensor([[0.6, 0.0, 0.8], [0.8, 0.6, 0.0], [0.0, 0.8, 0.6]], dtype=torch.float64)
COSINES = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]


def small_vit(**kwargs):
    """HLIP's three-level layout (slice, scan, study) on 16 x 16 x 8 scans: 2 x 2 x 2 tokens per scan."""
    return build_backbone("vit", "tiny", input_size=(16, 16, 8), patch_size=(8, 8, 4), layout="slice", max_scans=4,
                          **kwargs)


def small_text_encoder(reports=REPORTS, width: int = 64):
    vocabulary = ReportTokenizer.from_reports(list(reports) + [" ".join(FINDINGS).replace("_", " ")]).vocabulary
    return SmallTextEncoder(vocabulary, width=width, depth=2, num_heads=4, max_length=32)


def small_pretext(**kwargs) -> CLIPPretext:
    torch.manual_seed(0)
    return CLIPPretext(small_vit(), small_text_encoder(), embedding_dim=32, **kwargs)


def study_batch(count: int = 4, scans: int = 2, seed: int = 0) -> dict:
    """Random studies (zero-mean noise, each study its own) of ``scans`` scans, the last scan of study 0 padding."""
    images = torch.randn(count, scans, 1, 16, 16, 8, generator=torch.Generator().manual_seed(seed))
    scan_mask = torch.ones(count, scans, dtype=torch.bool)
    scan_mask[0, -1] = False
    return {"image": images, "scan_mask": scan_mask, "report": REPORTS[:count], "findings": LABELS[:count]}


def softmax_log_likelihood(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -(logits[target] - math.log(sum(math.exp(value) for value in logits)))


# --------------------------------------------------------------------------------------------------
# Losses by hand
# --------------------------------------------------------------------------------------------------
def test_clip_loss_by_hand_and_symmetric_in_the_two_modalities():
    scale = 2.0
    study_to_report = sum(softmax_log_likelihood([scale * c for c in COSINES[i]], i) for i in range(3)) / 3
    report_to_study = sum(softmax_log_likelihood([scale * COSINES[j][i] for j in range(3)], i) for i in range(3)) / 3
    loss = clip_loss(STUDIES, PAIRED_REPORTS, torch.tensor(scale, dtype=torch.float64))
    assert loss.item() == pytest.approx((study_to_report + report_to_study) / 2)

    # Swapping the modalities gives the same loss, although each direction alone differs.
    embeddings = F.normalize(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    studies, reports = embeddings
    scale = torch.tensor(5.0)
    torch.testing.assert_close(clip_loss(studies, reports, scale), clip_loss(reports, studies, scale))
    one_way = F.cross_entropy(scale * studies @ reports.T, torch.arange(6))
    other_way = F.cross_entropy(scale * reports @ studies.T, torch.arange(6))
    assert abs(one_way - other_way) > 1e-2
    torch.testing.assert_close(clip_loss(studies, reports, scale), (one_way + other_way) / 2)


def test_siglip_loss_by_hand():
    scale, bias = 3.0, -1.5
    by_hand = sum(math.log(1 + math.exp(-(1 if i == j else -1) * (scale * COSINES[i][j] + bias)))
                  for i in range(3) for j in range(3)) / 3
    loss = siglip_loss(STUDIES, PAIRED_REPORTS, torch.tensor(scale, dtype=torch.float64),
                       torch.tensor(bias, dtype=torch.float64))
    assert loss.item() == pytest.approx(by_hand)


def test_sentence_matching_loss_by_hand():
    """Reports 0 and 1 read alike (cos 0.8), report 2 differs from both (cos 0); studies: cos(0, 1) = 0.6,
    cos(0, 2) = 0, cos(1, 2) = 0.8. Targets and predictions over the two other studies of each anchor."""
    reports = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    studies = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    scale = 4.0
    report_cosines = [[None, 0.8, 0.0], [0.8, None, 0.0], [0.0, 0.0, None]]
    study_cosines = [[None, 0.6, 0.0], [0.6, None, 0.8], [0.0, 0.8, None]]
    total = 0.0
    for i in range(3):
        others = [j for j in range(3) if j != i]
        target_norm = sum(math.exp(scale * report_cosines[i][j]) for j in others)
        prediction_norm = sum(math.exp(scale * study_cosines[i][j]) for j in others)
        total -= sum(math.exp(scale * report_cosines[i][j]) / target_norm
                     * math.log(math.exp(scale * study_cosines[i][j]) / prediction_norm) for j in others)
    reports.requires_grad_(True)
    loss = sentence_matching_loss(studies, reports, torch.tensor(scale, dtype=torch.float64))
    assert loss.item() == pytest.approx(total / 3)
    assert not loss.requires_grad  # the report similarities are targets: no gradient to the text side


def _gathered_losses_worker(rank: int, world_size: int, studies: torch.Tensor, reports: torch.Tensor) -> list:
    """One of two gloo processes holding half of the batch's study and report embeddings."""
    rows = studies.shape[0] // world_size
    local_studies = studies[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    local_reports = reports[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    losses = [clip_loss(local_studies, local_reports, scale), siglip_loss(local_studies, local_reports, scale, bias),
              sentence_matching_loss(local_studies, local_reports, scale)]
    sum(losses).backward()
    return [*losses, local_studies.grad, local_reports.grad, scale.grad, bias.grad]


def test_gathered_losses_over_two_processes_equal_the_single_process_losses():
    """Two gloo ranks with three pairs each: the mean of the ranks' losses is the whole batch's loss, and the
    gradients averaged over ranks (as DDP does) are the whole batch's gradients, embeddings and scale alike."""
    generator = torch.Generator().manual_seed(1)
    studies = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    reports = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    whole_studies, whole_reports = studies.clone().requires_grad_(True), reports.clone().requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    expected = [clip_loss(whole_studies, whole_reports, scale), siglip_loss(whole_studies, whole_reports, scale, bias),
                sentence_matching_loss(whole_studies, whole_reports, scale)]
    sum(expected).backward()

    by_rank = on_gloo_ranks(_gathered_losses_worker, studies, reports)

    for index, loss in enumerate(expected):
        torch.testing.assert_close((by_rank[0][index] + by_rank[1][index]) / 2, loss.detach())
        assert by_rank[0][index] != by_rank[1][index]  # each rank's own anchors: the halves differ
    torch.testing.assert_close(torch.cat([by_rank[0][3], by_rank[1][3]]) / 2, whole_studies.grad)
    torch.testing.assert_close(torch.cat([by_rank[0][4], by_rank[1][4]]) / 2, whole_reports.grad)
    torch.testing.assert_close((by_rank[0][5] + by_rank[1][5]) / 2, scale.grad)
    torch.testing.assert_close((by_rank[0][6] + by_rank[1][6]) / 2, bias.grad)


# --------------------------------------------------------------------------------------------------
# The pretext
# --------------------------------------------------------------------------------------------------
def test_logit_scale_starts_at_the_temperature_and_is_clamped_at_100():
    pretext = small_pretext().eval()
    assert pretext.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    siglip = CLIPPretext(small_vit(), small_text_encoder(), embedding_dim=32, loss="siglip")
    assert siglip.logit_scale.item() == pytest.approx(math.log(10)) and siglip.logit_bias.item() == -10.0
    assert pretext.logit_bias is None  # no unused parameter for DDP

    batch = study_batch()
    with torch.no_grad():
        pretext.logit_scale.fill_(math.log(1000.0))
    output = pretext(batch)
    assert output["metric/logit_scale"].item() == 100.0
    with torch.no_grad():
        studies = pretext.encode_studies(batch["image"], batch["scan_mask"])
        reports = pretext.encode_reports(batch["report"])
    torch.testing.assert_close(output["loss"], clip_loss(studies, reports, torch.tensor(100.0)))
    output["loss"].backward()
    assert pretext.logit_scale.grad.item() == 0.0  # above the clamp: no gradient
    pretext.after_step()
    assert pretext.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)

    with torch.no_grad():  # below the clamp: after_step leaves it alone, and the scale has a gradient
        pretext.logit_scale.fill_(math.log(20.0))
    pretext.zero_grad()
    output = pretext(batch)
    assert output["metric/logit_scale"].item() == pytest.approx(20.0)
    output["loss"].backward()
    assert pretext.logit_scale.grad.item() != 0.0
    pretext.after_step()
    assert pretext.logit_scale.item() == pytest.approx(math.log(20.0))


def test_forward_outputs_and_gradients_for_both_losses_with_sentence_matching():
    pretext = small_pretext(sentence_matching_weight=0.5)
    output = pretext(study_batch())
    assert set(output) == {"loss", "loss/contrastive", "loss/sentence_matching", "metric/logit_scale",
                           "metric/batch_top1", "health/embedding_std", "health/top_component_share",
                           "health/collapsed"}  # 4 studies: the top component's share is defined
    assert all(value.ndim == 0 and torch.isfinite(value) for value in output.values())
    assert all(not value.requires_grad for key, value in output.items() if key != "loss")
    torch.testing.assert_close(output["loss"].detach(),
                               output["loss/contrastive"] + 0.5 * output["loss/sentence_matching"])
    assert output["metric/batch_top1"].item() in (0.0, 0.25, 0.5, 0.75, 1.0)
    output["loss"].backward()
    for parameter in [pretext.cls_token, pretext.study_projection.weight, pretext.report_projection.weight,
                      pretext.logit_scale, pretext.backbone.blocks[0].attn.qkv.weight,
                      pretext.text_encoder.token_embedding.weight]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0

    siglip = CLIPPretext(pretext.backbone, pretext.text_encoder, embedding_dim=32, loss="siglip")
    single_scans = {"image": torch.randn(3, 1, 16, 16, 8), "report": REPORTS[:3]}  # [B, C, X, Y, Z], no mask
    output = siglip(single_scans)
    assert set(output) == {"loss", "loss/siglip", "metric/logit_scale", "metric/batch_top1", "health/embedding_std",
                           "health/top_component_share", "health/collapsed"}
    output["loss"].backward()
    assert siglip.logit_bias.grad.abs() > 0 and siglip.cls_token.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's bf16: embeddings and losses stay float32
        output = siglip(single_scans)
    assert all(value.dtype == torch.float32 for value in output.values())


def test_padded_scans_do_not_change_the_study_embedding():
    pretext = small_pretext().eval()  # evaluation: the scan-index embedding is not permuted at random
    studies = torch.randn(2, 2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    padding = 10 * torch.randn(2, 2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(1))
    padded = torch.cat([studies, padding], dim=1)
    scan_mask = torch.tensor([[True, True, False, False]] * 2)
    with torch.no_grad():
        plain = pretext.encode_studies(studies)
        torch.testing.assert_close(pretext.encode_studies(padded, scan_mask), plain, rtol=0, atol=1e-5)
        assert not torch.allclose(pretext.encode_studies(padded), plain, atol=1e-3)  # unmasked, the padding counts
        torch.testing.assert_close(plain.norm(dim=-1), torch.ones(2))
        # a study of one scan: the same padded or not (it carries its scan-index embedding either way)
        one_scan = studies[:, :1]
        torch.testing.assert_close(pretext.encode_studies(torch.cat([one_scan, padding], dim=1),
                                                          torch.tensor([[True, False, False]] * 2)),
                                   pretext.encode_studies(one_scan), rtol=0, atol=1e-5)

    # A backbone without tokens (the Swin encoder): each valid scan alone, the study feature their mean.
    torch.manual_seed(0)
    swin = CLIPPretext(build_backbone("swin", "tiny", window_size=2), small_text_encoder(), embedding_dim=16).eval()
    scans = torch.randn(2, 3, 1, 32, 32, 64, generator=torch.Generator().manual_seed(2))
    scan_mask = torch.tensor([[True, False, True], [True, True, True]])
    with torch.no_grad():
        features = [swin.backbone(scans[0, [0, 2]]).mean(dim=0), swin.backbone(scans[1]).mean(dim=0)]
        expected = F.normalize(swin.study_projection(torch.stack(features)), dim=-1)
        torch.testing.assert_close(swin.encode_studies(scans, scan_mask), expected, rtol=0, atol=1e-5)


def test_configuration_and_batch_errors():
    backbone, text_encoder = small_vit(), small_text_encoder()
    for kwargs, message in [({"loss": "triplet"}, "unknown CLIP loss"), ({"initial_temperature": 0.0}, "initial_temp"),
                            ({"max_logit_scale": -1.0}, "max_logit_scale"),
                            ({"sentence_matching_weight": -1.0}, "sentence_matching_weight")]:
        with pytest.raises(ConfigError, match=message):
            CLIPPretext(backbone, text_encoder, **kwargs)
    with pytest.raises(ConfigError, match="text encoder"):
        CLIPPretext(backbone, torch.nn.Linear(2, 2))
    pretext = CLIPPretext(backbone, text_encoder, embedding_dim=16)
    batch = study_batch(2)
    for change, message in [({"report": None}, "batch\\['report'\\]"), ({"report": ["one report"]}, "2 report texts"),
                            ({"image": torch.rand(2, 16, 16)}, "batch\\['image'\\]"),
                            ({"scan_mask": torch.ones(2, 3, dtype=torch.bool)}, "scan_mask"),
                            ({"scan_mask": torch.tensor([[True, True], [False, False]])}, "no valid scan")]:
        with pytest.raises(ConfigError, match=message):
            pretext({**batch, **change})
    with pytest.raises(ConfigError, match="at least 2 studies"):
        pretext(study_batch(1))


def test_clip_loss_falls_when_training_on_a_fixed_batch_of_studies():
    """30 AdamW steps on four random studies with distinct reports: the mean loss of the last five steps lies well
    below that of the first five (measured: 0.007-0.63 of it for five seeds; 0.02 for this one), and more studies
    find their own report than by chance (1/4)."""
    pretext = small_pretext()
    batch = study_batch(4)
    optimizer = torch.optim.AdamW([p for p in pretext.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(30):
        output = pretext(batch)
        optimizer.zero_grad()
        output["loss"].backward()
        optimizer.step()
        pretext.after_step()
        losses.append(output["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert output["metric/batch_top1"].item() >= 0.5


def test_views_and_their_picture(tmp_path):
    pretext = small_pretext().train()
    views = pretext.views(study_batch(4, scans=3))
    assert pretext.training
    assert views["scans"].shape == (4, 3, 16, 16) and views["scan_mask"].tolist()[0] == [True, True, False]
    assert views["reports"] == REPORTS and views["similarity"].shape == (4, 4)
    assert views["similarity"].abs().max() <= 1 + 1e-5 and views["logit_scale"] == pytest.approx(1 / 0.07)
    path = save_views_picture(views, tmp_path / "views" / "clip.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.png"]


def test_study_images_accepts_single_scans_and_strips_metadata():
    from monai.data import MetaTensor

    images, scan_mask = study_images({"image": MetaTensor(torch.zeros(2, 1, 16, 16, 8))})
    assert images.shape == (2, 1, 1, 16, 16, 8) and type(images) is torch.Tensor and scan_mask is None
    images, scan_mask = study_images({"image": torch.zeros(2, 3, 1, 16, 16, 8), "scan_mask": torch.ones(2, 3)})
    assert scan_mask.dtype == torch.bool and scan_mask.shape == (2, 3)


# --------------------------------------------------------------------------------------------------
# Zero-shot evaluation
# --------------------------------------------------------------------------------------------------
def test_prompts():
    assert finding_phrase("liver_lesion") == "liver lesion" and finding_phrase("CT-Ascites") == "CT ascites"
    negatives, positives = prompt_pairs("liver lesion")
    assert len(negatives) == len(positives) == len(DEFAULT_PROMPT_TEMPLATES)
    assert (negatives[0], positives[0]) == ("No liver lesion.", "Liver lesion.")
    assert all("liver lesion" in text.lower() for text in negatives + positives)
    with pytest.raises(ConfigError, match="prompt templates"):
        prompt_pairs("mass", [("No mass.", "Mass.")])


def test_zero_shot_probabilities_are_the_pair_softmax_of_the_averaged_prompts():
    pretext = small_pretext().eval()
    studies = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = 1 / 0.07
    templates = [("No {finding}.", "{finding}."), ("There is no {finding}.", "There is {finding}.")]
    probabilities = zero_shot_probabilities(pretext, studies, ["liver lesion", "ascites"], templates[:1])
    assert probabilities.shape == (3, 2)
    with torch.no_grad():
        for finding, phrase in enumerate(["liver lesion", "ascites"]):
            negative, positive = pretext.encode_reports([f"No {phrase}.", f"{phrase.capitalize()}."])
            for study in range(3):  # a softmax over the pair: positive and negative sum to 1
                positive_logit, negative_logit = scale * studies[study] @ positive, scale * studies[study] @ negative
                expected = math.exp(positive_logit) / (math.exp(positive_logit) + math.exp(negative_logit))
                assert probabilities[study, finding].item() == pytest.approx(expected, rel=1e-4)
        # Two templates: the prompt embeddings averaged over templates and re-normalised, then the pair softmax.
        texts = [text for pair in templates for text in pair]
        embeddings = pretext.encode_reports([text.format(finding="ascites").capitalize() for text in texts])
        negative = F.normalize(embeddings[0::2].mean(0), dim=-1)
        positive = F.normalize(embeddings[1::2].mean(0), dim=-1)
        logits = scale * studies @ torch.stack([negative, positive]).T
        torch.testing.assert_close(zero_shot_probabilities(pretext, studies, ["ascites"], templates)[:, 0],
                                   logits.softmax(dim=-1)[:, 1])


def test_balanced_accuracy_by_hand():
    probabilities = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.8, 0.7], [0.3, 0.1, 0.2], [0.7, 0.6, 0.9],
                                  [0.2, 0.3, 0.1]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, float("nan"), float("nan")],
                           [0.0, 1.0, 1.0], [0.0, 0.0, float("nan")]])
    # finding 0: positives (0.9 yes, 0.4 no) -> 1/2; negatives (0.3 yes, 0.7 no, 0.2 yes) -> 2/3
    # finding 1: positives (0.8, 0.6) -> 1; negatives (0.2, 0.3) -> 1; finding 2: positives only -> NaN
    accuracy = balanced_accuracy(probabilities, labels)
    assert accuracy[0].item() == pytest.approx((1 / 2 + 2 / 3) / 2) and accuracy[1].item() == pytest.approx(1.0)
    assert math.isnan(accuracy[2].item())
    assert balanced_accuracy(probabilities, labels, threshold=0.85)[1].item() == pytest.approx(0.5)


def test_roc_auc_equals_the_rank_based_auc_by_hand():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 3, generator=generator)
    scores[:10, 0] = 0.5  # ties count one half
    labels = (torch.rand(40, 3, generator=generator) < 0.4).float()
    labels[torch.rand(40, 3, generator=generator) < 0.2] = float("nan")
    labels[:, 2] = torch.where(torch.isnan(labels[:, 2]), labels[:, 2], 1.0)  # one class only
    auc = roc_auc(scores, labels)
    for finding in range(2):
        known = ~torch.isnan(labels[:, finding])
        positives = scores[known & (labels[:, finding] == 1), finding].tolist()
        negatives = scores[known & (labels[:, finding] == 0), finding].tolist()
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
        assert auc[finding].item() == pytest.approx(wins / (len(positives) * len(negatives)))
    assert math.isnan(auc[2].item())


def test_recall_at_k_on_a_crafted_similarity():
    # query i's match is candidate i; similarities (dot products of one-hot rows) place the matches at ranks
    # 0, 2, 1, 0 (query 1: candidates 0 and 3 closer, query 2: candidate 1 closer).
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.8, 0.5, 0.1, 0.7], [0.0, 0.6, 0.4, 0.2],
                               [0.1, 0.2, 0.3, 0.9]])
    recalls = recall_at_k(similarity, torch.eye(4), ks=(1, 2, 3, 5))
    assert recalls == {1: 0.5, 2: 0.75, 3: 1.0}


def test_evaluate_zero_shot_scores_every_study_and_restores_the_mode():
    pretext = small_pretext().train()
    second = study_batch(4, seed=1)
    batches = [study_batch(2, seed=0), {key: value[2:] for key, value in second.items()}]  # studies 2, 3
    metrics = evaluate_zero_shot(pretext, batches, FINDINGS, "cpu", ks=(1, 2, 5), phrases={"liver_lesion": "lesion"})
    assert pretext.training
    expected_keys = {f"metric/zero_shot/{name}/{metric}" for name in FINDINGS for metric in ("auc", "balanced_accuracy")}
    expected_keys |= {"metric/zero_shot/mean_auc", "metric/zero_shot/mean_balanced_accuracy"}
    expected_keys |= {f"metric/retrieval/{direction}_recall_at_{k}" for direction in ("study_to_report", "report_to_study")
                      for k in (1, 2)}  # 4 studies: K = 5 skipped
    assert set(metrics) == expected_keys

    # The same numbers from the parts: embeddings, prompt probabilities, metrics.
    pretext.eval()
    with torch.no_grad():
        studies = torch.cat([pretext.encode_studies(b["image"], b["scan_mask"]) for b in batches])
        reports = torch.cat([pretext.encode_reports(b["report"]) for b in batches])
    labels = torch.cat([b["findings"] for b in batches])
    probabilities = zero_shot_probabilities(pretext, studies, ["lesion", "pleural effusion"])
    auc, accuracy = roc_auc(probabilities, labels), balanced_accuracy(probabilities, labels)
    assert metrics["metric/zero_shot/liver_lesion/auc"] == pytest.approx(auc[0].item(), nan_ok=True)
    assert metrics["metric/zero_shot/pleural_effusion/balanced_accuracy"] == pytest.approx(accuracy[1].item())
    assert metrics["metric/zero_shot/mean_auc"] == pytest.approx(auc.nanmean().item())
    for k, recall in recall_at_k(reports, studies, (1, 2)).items():
        assert metrics[f"metric/retrieval/report_to_study_recall_at_{k}"] == pytest.approx(recall)
    assert metrics["metric/retrieval/study_to_report_recall_at_2"] >= metrics["metric/retrieval/study_to_report_recall_at_1"]
    with pytest.raises(ConfigError, match="findings"):
        evaluate_zero_shot(pretext, batches, FINDINGS[:1], "cpu")
