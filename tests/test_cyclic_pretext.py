"""Cyclic multi-task pretraining: the task order, per-task prefixes, one shared backbone, validation of all tasks,
the step counter in checkpoints, and a Swin backbone shared by VoCo and SimMIM."""

from __future__ import annotations

import pytest
import torch

from voco.errors import ConfigError
from voco.geometry import CropLayout
from voco.networks import build_backbone
from voco.pretext.contrastive import ContrastivePretext
from voco.pretext.cyclic import CyclicPretext, save_views_picture, task_prefixed
from voco.pretext.mae import MaskedImagePretext
from voco.pretext.query_box import QueryBoxPretext
from voco.pretext.voco import VoCoPretext

REGION = (32, 32, 16)


def vit_tasks(seed: int = 0) -> CyclicPretext:
    torch.manual_seed(seed)
    backbone = build_backbone("vit", "tiny", input_size=REGION, patch_size=8, layout="window", window_size=2)
    return CyclicPretext({
        "mae": MaskedImagePretext(backbone, variant="simmim", mask_ratio=0.5, generator=seed),
        "contrastive": ContrastivePretext(backbone, embedding_dim=16, generator=seed),
        "query_box": QueryBoxPretext(backbone, generator=seed),
    })


def regions(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, *REGION, generator=torch.Generator().manual_seed(seed))


def test_task_prefixes():
    output = {"loss": 1.0, "loss/reconstruction": 2.0, "metric/box_iou": 3.0, "health/embedding_std": 0.1,
              "teacher_momentum": 0.9}
    assert task_prefixed("mae", output) == {"loss/mae": 1.0, "loss/mae/reconstruction": 2.0,
                                            "metric/mae/box_iou": 3.0, "health/mae/embedding_std": 0.1,
                                            "mae/teacher_momentum": 0.9}


def test_step_t_runs_task_t_mod_n_and_logs_every_task_under_its_prefix():
    pretext = vit_tasks()
    optimizer = torch.optim.AdamW(pretext.parameters(), lr=1e-4)
    ran = []
    for step in range(7):
        output = pretext({"image": regions(seed=step)})
        ran.append(pretext.task_names[output["task"]])
        output["loss"].backward()
        # the loss of the step is the running task's, attached to the graph; the others' are the latest values
        assert output["loss"] is not None and output["loss"].requires_grad
        assert torch.equal(output["loss"].detach(), output[f"loss/{ran[-1]}"].detach())
        optimizer.step()
        optimizer.zero_grad()
        pretext.after_step()
    assert ran == ["mae", "contrastive", "query_box", "mae", "contrastive", "query_box", "mae"]
    assert int(pretext.step) == 7
    # after one full cycle every task's losses and metrics are in every output
    for name in ["loss/mae/reconstruction", "metric/mae/reconstruction_psnr", "loss/contrastive",
                 "metric/contrastive/retrieval_top1", "loss/query_box/giou", "metric/query_box/box_iou",
                 "health/contrastive/collapsed", "health/query_box/top_component_share"]:
        assert name in output, name


def test_only_the_running_task_gets_gradients():
    pretext = vit_tasks()
    pretext({"image": regions()})["loss"].backward()  # step 0: mae
    assert pretext.tasks["mae"].mask_token.grad is not None
    shared = {id(p) for p in pretext.backbone.parameters()}
    heads = [p for p in pretext.tasks["query_box"].parameters() if id(p) not in shared]
    assert heads and all(p.grad is None for p in heads)
    assert pretext.backbone.patch_embedding.patch_embeddings.weight.grad is not None


def test_validation_runs_every_task_on_the_same_batch():
    pretext = vit_tasks().eval()
    with torch.no_grad():
        output = pretext({"image": regions()})
    parts = [output[f"loss/{name}"] for name in ("mae", "contrastive", "query_box")]
    assert torch.allclose(output["loss"], sum(parts))
    assert int(pretext.step) == 0  # validation does not move the cycle


def test_the_cycle_resumes_from_a_state_dict():
    pretext = vit_tasks()
    for _ in range(2):
        pretext.after_step()
    state = pretext.state_dict()
    assert "step" in state and "backbone.blocks.0.attn.qkv.weight" in state
    resumed = vit_tasks(seed=1)
    resumed.load_state_dict(state)
    assert resumed.current_task() == "query_box"


def test_tasks_must_share_one_backbone_and_names_must_exist():
    first = build_backbone("vit", "tiny", input_size=REGION, patch_size=8)
    second = build_backbone("vit", "tiny", input_size=REGION, patch_size=8)
    with pytest.raises(ConfigError, match="share one backbone"):
        CyclicPretext({"mae": MaskedImagePretext(first), "query_box": QueryBoxPretext(second)})
    with pytest.raises(ConfigError, match="no task 'clip'"):
        CyclicPretext({"mae": MaskedImagePretext(first), "voco": None}, order=["mae", "clip"])
    with pytest.raises(ConfigError, match="no task"):
        CyclicPretext({"voco": None})
    # tasks switched off (None) are left out; order picks and orders the rest
    pretext = CyclicPretext({"mae": MaskedImagePretext(first), "query_box": QueryBoxPretext(first), "voco": None},
                            order=["query_box", "mae"])
    assert pretext.task_names == ["query_box", "mae"]


def test_voco_and_simmim_share_a_swin_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("swin", "tiny", window_size=2)
    layout = CropLayout.tiled((32, 32, 64), (2, 2))
    pretext = CyclicPretext({"voco": VoCoPretext(backbone, layout=layout, projector_hidden_dim=32,
                                                 projector_out_dim=32, generator=0),
                             "mae": MaskedImagePretext(backbone, variant="auto", generator=0)})
    assert pretext.tasks["mae"].variant == "simmim"  # the Swin cannot drop tokens
    images = torch.rand(2, 1, *layout.region_size, generator=torch.Generator().manual_seed(0))
    for expected in ("voco", "mae"):
        output = pretext({"image": images})
        assert pretext.task_names[output["task"]] == expected
        output["loss"].backward()
        pretext.after_step()
    assert "metric/voco/position_mae" in output and "metric/mae/reconstruction_psnr" in output


def test_views_picture_per_task(tmp_path):
    pretext = vit_tasks()
    views = pretext.views({"image": regions()})
    assert set(views) == {"mae", "contrastive", "query_box"}
    paths = save_views_picture(views, tmp_path / "views.png")
    assert sorted(path.name for path in paths) == ["views_contrastive.png", "views_mae.png", "views_query_box.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)
