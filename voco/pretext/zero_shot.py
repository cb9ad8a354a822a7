"""Zero-shot evaluation of a study-report model (`voco.pretext.clip.CLIPPretext`): findings from prompt pairs, and
study <-> report retrieval.

1. **Prompts.** Each finding (``liver_lesion`` -> "liver lesion") goes into T templates, each a (negative,
   positive) pair such as ("No liver lesion.", "Liver lesion."). The T negative prompt embeddings are averaged and
   re-normalised, and so are the T positive ones (CLIP's prompt ensembling).
2. **Probability.** For a study embedding x: ``p(finding) = softmax(s [x . negative, x . positive])[1]``, the
   softmax over the pair at the model's logit scale s (HLIP).
3. **Metrics** per finding over the studies whose label is known (NaN labels are left out): ROC AUC
   (``monai.metrics.compute_roc_auc``) and balanced accuracy at p >= 0.5 (MONAI's confusion-matrix metric); both NaN
   where the known labels hold one class only. Their means over findings skip NaN.
4. **Retrieval.** Recall@K of the matching report among all reports for each study, and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode

from voco.errors import ConfigError
from voco.pretext.clip import batch_reports, study_images

if TYPE_CHECKING:
    from voco.pretext.clip import CLIPPretext

DEFAULT_PROMPT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("No {finding}.", "{finding}."),
    ("There is no {finding}.", "There is {finding}."),
    ("No evidence of {finding}.", "Evidence of {finding}."),
    ("{finding} is absent.", "{finding} is present."),
)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
def finding_phrase(name: str) -> str:
    """A finding's name as words in a sentence: underscores and hyphens become spaces, words lowercased except
    acronyms (all capitals).

    >>> finding_phrase("liver_lesion"), finding_phrase("Pleural-Effusion"), finding_phrase("COPD")
    ('liver lesion', 'pleural effusion', 'COPD')
    """
    words = str(name).replace("_", " ").replace("-", " ").split()
    return " ".join(word if word.isupper() and len(word) > 1 else word.lower() for word in words)


def _sentence(text: str) -> str:
    """The first letter in capitals, the rest as given (acronyms stay)."""
    return text[:1].upper() + text[1:]


def prompt_pairs(finding: str, templates: Sequence[Sequence[str]] = DEFAULT_PROMPT_TEMPLATES
                 ) -> tuple[list[str], list[str]]:
    """The negative and the positive prompts of a finding phrase, one of each per template.

    >>> prompt_pairs("liver lesion", [("No {finding}.", "{finding}.")])
    (['No liver lesion.'], ['Liver lesion.'])
    """
    if not templates or any(len(pair) != 2 or "{finding}" not in pair[0] + pair[1] for pair in templates):
        raise ConfigError(f"the prompt templates {list(templates)!r} are not (negative, positive) pairs containing "
                          "'{finding}'; give e.g. [['No {finding}.', '{finding}.']].")
    negatives = [_sentence(negative.format(finding=finding)) for negative, _ in templates]
    positives = [_sentence(positive.format(finding=finding)) for _, positive in templates]
    return negatives, positives


@torch.no_grad()
def zero_shot_probabilities(pretext: CLIPPretext, study_embeddings: torch.Tensor, findings: Sequence[str],
                            templates: Sequence[Sequence[str]] = DEFAULT_PROMPT_TEMPLATES) -> torch.Tensor:
    """The probability of each finding for each study: ``[N, F]`` from ``study_embeddings [N, E]``.

    Args:
        pretext: gives the prompt embeddings (``encode_reports``) and the logit scale.
        study_embeddings: L2-normalised study embeddings (``pretext.encode_studies``).
        findings: the F finding phrases put into the templates as given (see `finding_phrase`).
        templates: (negative, positive) pairs of sentences with ``{finding}``.
    """
    prompts = [prompt_pairs(finding, templates) for finding in findings]
    texts = [text for negatives, positives in prompts for text in negatives + positives]
    embeddings = pretext.encode_reports(texts).view(len(findings), 2, len(templates), -1)  # [F, neg|pos, T, E]
    classes = F.normalize(embeddings.mean(dim=2), dim=-1).to(study_embeddings)  # prompt ensembling: [F, 2, E]
    logits = pretext.current_logit_scale().to(study_embeddings) * torch.einsum("ne,fce->nfc", study_embeddings,
                                                                                 classes)
    return logits.softmax(dim=-1)[..., 1]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def balanced_accuracy(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``(sensitivity + specificity) / 2`` per finding ``[F]`` from ``probabilities [N, F]`` and 0/1 ``labels [N, F]``
    (NaN: unknown, left out); NaN where the known labels hold one class only.

    >>> balanced_accuracy(torch.tensor([[0.9], [0.2], [0.7], [0.1]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    tensor([0.5000])
    """
    from monai.metrics import compute_confusion_matrix_metric

    known = ~torch.isnan(labels)
    predicted, actual = probabilities >= threshold, labels == 1
    confusion = torch.stack([(known & predicted & actual).sum(0), (known & predicted & ~actual).sum(0),
                             (known & ~predicted & ~actual).sum(0), (known & ~predicted & actual).sum(0)], dim=-1)
    return compute_confusion_matrix_metric("balanced accuracy", confusion.float())  # [F, (tp, fp, tn, fn)] -> [F]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC per finding ``[F]`` (``monai.metrics.compute_roc_auc``) from ``scores [N, F]`` and 0/1 ``labels [N, F]``
    (NaN: unknown, left out); NaN where the known labels hold one class only.

    >>> roc_auc(torch.tensor([[0.9], [0.2], [0.7], [0.1]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    tensor([0.7500])
    """
    from monai.metrics import compute_roc_auc

    values = []
    for finding in range(labels.shape[1]):
        known = ~torch.isnan(labels[:, finding])
        y = labels[known, finding]
        # Checked here: MONAI would warn and give NaN, one warning per finding and evaluation.
        one_class = bool((y == 1).all()) or bool((y == 0).all())
        values.append(float("nan") if one_class else float(compute_roc_auc(scores[known, finding].float().cpu(),
                                                                           y.cpu())))
    return torch.tensor(values)


def recall_at_k(query: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K: the share of queries ``[N, E]`` whose match (candidate i for query i, of ``candidates [N, E]``) is
    among their K most similar candidates (dot product; ties count in the match's favour). K > N is skipped.

    >>> recall_at_k(torch.eye(4), torch.eye(4)[[1, 0, 2, 3]], ks=(1, 2, 5))  # studies 0 and 1 swapped their reports
    {1: 0.5, 2: 1.0}
    """
    if query.shape != candidates.shape:
        raise ConfigError(f"recall_at_k needs one candidate per query, got {tuple(query.shape)} queries and "
                          f"{tuple(candidates.shape)} candidates.")
    similarity = query.float() @ candidates.float().T
    rank = (similarity > similarity.diagonal()[:, None]).sum(dim=1)  # candidates strictly closer than the match
    return {int(k): float((rank < k).float().mean()) for k in ks if k <= query.shape[0]}


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_zero_shot(pretext: CLIPPretext, data_loader: Iterable, finding_names: Sequence[str],
                       device: torch.device | str, templates: Sequence[Sequence[str]] = DEFAULT_PROMPT_TEMPLATES,
                       ks: Sequence[int] = (1, 5, 10), phrases: Mapping[str, str] | None = None) -> dict[str, float]:
    """Embed every study and report of ``data_loader`` and score zero-shot findings and retrieval.

    Args:
        pretext: the trained model; run in evaluation mode (its previous mode is restored).
        data_loader: batches ``{"image", "scan_mask" (optional), "report", "findings" [B, F] (1 / 0 / NaN)}``.
        finding_names: the F names of the columns of ``findings`` (also the metric names).
        device: where the studies are encoded.
        templates: (negative, positive) prompt pairs.
        ks: the K of Recall@K (K above the number of studies is skipped).
        phrases: optional finding name -> phrase for the prompts; default `finding_phrase` of the name.

    Returns ``metric/zero_shot/<finding>/auc``, ``metric/zero_shot/<finding>/balanced_accuracy``,
    ``metric/zero_shot/mean_auc``, ``metric/zero_shot/mean_balanced_accuracy`` (means over findings, NaN skipped),
    ``metric/retrieval/study_to_report_recall_at_<k>`` and ``metric/retrieval/report_to_study_recall_at_<k>`` (Recall@K;
    MLflow metric names cannot hold an "@").
    """
    studies, reports, labels = [], [], []
    with eval_mode(pretext):
        for batch in data_loader:
            images, scan_mask = study_images(batch)
            studies.append(pretext.encode_studies(images.to(device), None if scan_mask is None else
                                                  scan_mask.to(device)).cpu())
            reports.append(pretext.encode_reports(batch_reports(batch, images.shape[0])).cpu())
            findings = torch.as_tensor(batch["findings"], dtype=torch.float32) if "findings" in batch else None
            if findings is None or findings.ndim != 2 or findings.shape[1] != len(finding_names):
                raise ConfigError(f"the zero-shot evaluation needs batch['findings'] of shape "
                                  f"[B, {len(finding_names)}] (one column per finding of {list(finding_names)[:5]}), "
                                  f"got {None if findings is None else tuple(findings.shape)}; check finding_names.")
            labels.append(findings.cpu())
        if not studies:
            raise ConfigError("the zero-shot evaluation data loader gave no batch; check the evaluation datalist.")
        studies, reports, labels = torch.cat(studies), torch.cat(reports), torch.cat(labels)
        phrases = dict(phrases or {})
        probabilities = zero_shot_probabilities(
            pretext, studies.to(device), [phrases.get(name, finding_phrase(name)) for name in finding_names],
            templates).cpu()

    auc, accuracy = roc_auc(probabilities, labels), balanced_accuracy(probabilities, labels)
    metrics: dict[str, float] = {}
    for index, name in enumerate(finding_names):
        metrics[f"metric/zero_shot/{name}/auc"] = float(auc[index])
        metrics[f"metric/zero_shot/{name}/balanced_accuracy"] = float(accuracy[index])
    metrics["metric/zero_shot/mean_auc"] = float(auc.nanmean())
    metrics["metric/zero_shot/mean_balanced_accuracy"] = float(accuracy.nanmean())
    for direction, (query, candidates) in {"study_to_report": (studies, reports),
                                           "report_to_study": (reports, studies)}.items():
        for k, recall in recall_at_k(query, candidates, ks).items():
            metrics[f"metric/retrieval/{direction}_recall_at_{k}"] = recall
    return metrics
