"""Per-task pipelines, networks, losses, pretrained-encoder initialisation and metrics of the downstream benchmark.

Tiny shapes throughout: Swin feature size 12, roi 32 x 32 x 64, phantoms of 32 x 32 x 16 voxels.
"""

from __future__ import annotations

import dataclasses

import nibabel
import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.networks.nets import UNETR, SwinUNETR

from voco.benchmark.metrics import (classification_metrics, jacobian_determinant, non_positive_jacobian_fraction,
                                    registration_metrics, segmentation_metrics)
from voco.benchmark.networks import (EncoderClassifier, RegistrationLoss, RegistrationNetwork, build_task_network,
                                     decoder_of, encoder_of, initialize_from_pretrained, task_loss)
from voco.benchmark.registry import Intensity, Task
from voco.benchmark.transforms import ClassLabeld, registration_keys, task_transforms
from voco.data.phantoms import PHANTOM_CLASSES, make_phantom
from voco.errors import CheckpointError, ConfigError, ManifestError
from voco.networks import SwinEncoder

# Swin needs more than one voxel at stride 32 to train (instance norm), so one axis is 64.
ROI = (32, 32, 64)
ORGANS = tuple(name for index, name in sorted(PHANTOM_CLASSES.items()) if index)  # 11 foreground classes
CT_WINDOW = Intensity(kind="window", a_min=-175.0, a_max=250.0)
# The three tensors whose shape depends on the input channels (a 2-channel registration input vs 1 pretrained).
INPUT_CHANNEL_TENSORS = {"swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                         "encoder1.layer.conv3.conv.weight"}


def make_task(task_type: str, **fields) -> Task:
    defaults = {
        "segmentation": {"class_names": ORGANS, "in_channels": 1, "out_channels": len(ORGANS) + 1,
                         "metrics": ("Dice",)},
        "classification": {"class_names": ("no lesion", "lesion"), "in_channels": 1, "out_channels": 1,
                           "metrics": ("AUC", "ACC")},
        "registration": {"class_names": ORGANS, "in_channels": 2, "out_channels": 3,
                         "metrics": ("Dice", "non_positive_jacobian")},
    }[task_type]
    values = {"id": f"tiny-{task_type}", "dataset": "phantoms", "task_type": task_type, "modality": "CT",
              "body_region": "abdomen", "roi_size": ROI, "spacing": (3.0, 3.0, 3.0), "intensity": CT_WINDOW,
              **defaults, **fields}
    return Task(**values)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> dict[str, dict]:
    """Two small phantoms (one with a lesion) as NIfTI image + label files, in different stored orientations."""
    folder = tmp_path_factory.mktemp("phantoms")
    entries = {}
    for name, seed, orientation in (("first", 3, "LPS"), ("second", 11, "RAI")):
        phantom = make_phantom(seed, shape=(32, 32, 16), spacing=(3.0, 3.0, 6.0), orientation=orientation,
                               lesion_probability=1.0 if name == "first" else 0.0)
        image, label = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
        phantom.save(image, label)
        entries[name] = {"image": str(image), "label": str(label), "lesion": int(phantom.attributes["lesion"])}
    return entries


def train_one_step(network: torch.nn.Module, compute_loss) -> float:
    """One optimizer step; asserts the loss is finite and that trainable weights moved."""
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in network.parameters() if p.requires_grad]
    network.train()
    loss = compute_loss()
    assert loss.ndim == 0 and torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = [p.detach() for p in network.parameters() if p.requires_grad]
    assert any(not torch.equal(old, new) for old, new in zip(before, after))
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------- transforms


def test_segmentation_pipeline_gives_roi_crops_in_training_and_ras_volumes_for_validation(phantom_files):
    task = make_task("segmentation")
    entry = {"image": phantom_files["first"]["image"], "label": phantom_files["first"]["label"]}

    crops = task_transforms(task, train=True, num_samples=3)(entry)
    assert len(crops) == 3
    for crop in crops:
        assert crop["image"].shape == crop["label"].shape == (1, *ROI)
        assert type(crop["image"]) is torch.Tensor  # metadata stripped for training
        assert crop["image"].dtype == torch.float32
        # The window maps to [0, 1]; the augmentations scale by up to 1 +- 0.1, then shift by up to +-0.1.
        assert -0.1 - 1e-6 <= float(crop["image"].min()) and float(crop["image"].max()) <= 1.2 + 1e-6
        assert set(crop["label"].unique().tolist()) <= set(range(len(ORGANS) + 1))

    volume = task_transforms(task, train=False)(entry)
    assert nibabel.aff2axcodes(volume["image"].affine.numpy()) == ("R", "A", "S")
    assert np.allclose(volume["image"].pixdim.numpy(), 3.0)
    assert all(size >= roi for size, roi in zip(volume["image"].shape[1:], ROI))
    assert volume["label"].shape == volume["image"].shape
    # The phantom holds liver and spleen, so their labels survive resampling and the foreground crop.
    assert {1, 2} <= set(volume["label"].unique().int().tolist())


def test_zscore_intensity_normalises_the_foreground_and_none_keeps_the_values(phantom_files):
    task = make_task("segmentation", intensity=Intensity(kind="zscore"), spacing=None)
    volume = task_transforms(task, train=False)(dict(phantom_files["first"]))
    foreground = volume["image"][volume["image"] != 0]
    assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1.0) < 1e-2

    original = nibabel.load(phantom_files["first"]["image"]).get_fdata()
    for unscaled in (Intensity(kind="none"), None):
        task = make_task("segmentation", intensity=unscaled, spacing=None)
        volume = task_transforms(task, train=False)(dict(phantom_files["first"]))
        assert float(volume["image"].max()) == original.max()  # HU as stored, only reoriented and cropped


def test_classification_pipeline_fits_the_volume_and_types_the_label(phantom_files):
    binary = make_task("classification")
    entry = {"image": phantom_files["first"]["image"], "label": phantom_files["first"]["lesion"]}
    for fit in ("resize", "crop"):
        item = task_transforms(binary, train=True, classification_fit=fit)(entry)
        assert item["image"].shape == (1, *ROI)
        assert item["label"].dtype == torch.float32 and item["label"].tolist() == [1.0]

    three_classes = make_task("classification", class_names=("a", "b", "c"), out_channels=3)
    item = task_transforms(three_classes, train=False)({"image": entry["image"], "label": 2})
    assert item["label"].dtype == torch.long and item["label"].shape == () and int(item["label"]) == 2

    with pytest.raises(ManifestError, match="0..2"):
        ClassLabeld("label", num_outputs=3)({"label": 3})
    with pytest.raises(ManifestError):
        ClassLabeld("label", num_outputs=1)({"label": 0.5})
    with pytest.raises(ConfigError, match="classification_fit"):
        task_transforms(binary, train=False, classification_fit="squash")


def test_registration_pipeline_pairs_moving_and_fixed_on_one_grid(phantom_files):
    task = make_task("registration")
    moving_image, fixed_image, moving_label, fixed_label = registration_keys(task)
    assert (moving_image, fixed_label) == ("moving_image", "fixed_label")
    pair = {moving_image: phantom_files["first"]["image"], fixed_image: phantom_files["second"]["image"],
            moving_label: phantom_files["first"]["label"], fixed_label: phantom_files["second"]["label"]}

    item = task_transforms(task, train=True)(pair)
    assert item["image"].shape == (2, *ROI)
    assert torch.equal(item["image"][:1], item[moving_image]) and torch.equal(item["image"][1:], item[fixed_image])
    assert item[moving_label].shape == item[fixed_label].shape == (1, *ROI)

    unlabelled = task_transforms(task, train=False)({moving_image: pair[moving_image],
                                                     fixed_image: pair[fixed_image]})
    assert unlabelled["image"].shape == (2, *ROI) and moving_label not in unlabelled


def test_task_types_without_a_pipeline_or_network_are_refused():
    task = dataclasses.replace(make_task("segmentation"), task_type="vision-language")
    with pytest.raises(ConfigError, match="vision-language"):
        task_transforms(task, train=True)
    with pytest.raises(ConfigError, match="vision-language"):
        build_task_network(task, size="tiny")
    incomplete = dataclasses.replace(make_task("segmentation"), roi_size=None, runnable=False)
    with pytest.raises(ConfigError, match="no roi_size"):
        task_transforms(incomplete, train=False)
    with pytest.raises(ConfigError, match="no roi_size"):
        build_task_network(incomplete, size="tiny")
    with pytest.raises(ConfigError, match="divisible by 32"):
        build_task_network(make_task("segmentation", roi_size=(48, 48, 32)), size="tiny")
    with pytest.raises(ConfigError, match="64 voxels"):
        build_task_network(make_task("classification", roi_size=(32, 32, 32)), size="tiny")
    with pytest.raises(ConfigError, match="backbone 'vit'"):
        build_task_network(make_task("registration"), backbone="vit", size="tiny")


# ------------------------------------------------------------------------------------------ one training step


@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_segmentation_network_trains_one_step(phantom_files, backbone):
    task = make_task("segmentation")
    entry = {"image": phantom_files["first"]["image"], "label": phantom_files["first"]["label"]}
    batch = list_data_collate(task_transforms(task, train=True, num_samples=2)(entry))
    network = build_task_network(task, backbone=backbone, size="tiny")
    assert isinstance(network, SwinUNETR if backbone == "swin" else UNETR)
    loss_function = task_loss(task)

    def compute_loss() -> torch.Tensor:
        logits = network(batch["image"])
        assert logits.shape == (2, task.out_channels, *ROI)
        return loss_function(logits, batch["label"])

    train_one_step(network, compute_loss)


@pytest.mark.parametrize("out_channels", [1, 3])
def test_classification_network_trains_one_step(phantom_files, out_channels):
    task = make_task("classification", out_channels=out_channels,
                     class_names=("no lesion", "lesion") if out_channels == 1 else ("a", "b", "c"))
    transform = task_transforms(task, train=True)
    batch = list_data_collate([transform({"image": phantom_files[name]["image"],
                                          "label": phantom_files[name]["lesion"]}) for name in ("first", "second")])
    network = build_task_network(task, size="tiny", dropout=0.1)
    assert isinstance(network, EncoderClassifier) and network.head.in_features == 24 * 12
    loss_function = task_loss(task)
    assert isinstance(loss_function, torch.nn.BCEWithLogitsLoss if out_channels == 1 else torch.nn.CrossEntropyLoss)

    def compute_loss() -> torch.Tensor:
        logits = network(batch["image"])
        assert logits.shape == (2, out_channels)
        return loss_function(logits, batch["label"])

    train_one_step(network, compute_loss)


def test_registration_network_starts_near_identity_and_trains_one_step(phantom_files):
    task = make_task("registration")
    moving_image, fixed_image, moving_label, fixed_label = registration_keys(task)
    pair = {moving_image: phantom_files["first"]["image"], fixed_image: phantom_files["second"]["image"],
            moving_label: phantom_files["first"]["label"], fixed_label: phantom_files["second"]["label"]}
    batch = list_data_collate([task_transforms(task, train=True)(pair)])
    network = build_task_network(task, size="tiny")
    assert isinstance(network, RegistrationNetwork)

    with torch.no_grad():
        warped, ddf = network(batch["image"])
    assert warped.shape == (1, 1, *ROI) and ddf.shape == (1, 3, *ROI)
    assert float(ddf.abs().max()) < 0.01  # the output layer starts near zero: warped is the moving image
    assert torch.allclose(warped, batch[moving_image], atol=0.01)

    loss_function = task_loss(task, label_weight=1.0)
    assert isinstance(loss_function, RegistrationLoss) and loss_function.num_labels == len(ORGANS) + 1

    def compute_loss() -> torch.Tensor:
        warped, ddf = network(batch["image"])
        parts = loss_function.components(warped, batch[fixed_image], ddf, batch[moving_label], batch[fixed_label])
        assert set(parts) == {"loss", "loss/similarity", "loss/regularization", "loss/label_dice"}
        assert 0.0 < float(parts["loss/label_dice"].detach()) <= 1.0
        return parts["loss"]

    train_one_step(network, compute_loss)
    with pytest.raises(ConfigError, match="labels"):
        loss_function(warped, batch[fixed_image], ddf)


def test_registration_loss_is_minimal_for_a_perfect_smooth_match():
    image = torch.rand(1, 1, 12, 12, 12)
    affine_field = 0.1 * grid((12, 12, 12))[None]  # no bending energy: its second derivatives are zero
    parts = RegistrationLoss(kernel_size=3).components(image, image, affine_field)
    assert float(parts["loss/similarity"]) == pytest.approx(-1.0, abs=1e-3)  # LNCC of identical images
    assert float(parts["loss/regularization"]) == pytest.approx(0.0, abs=1e-6)
    mse = RegistrationLoss(similarity="mse", regularization="diffusion", regularization_weight=2.0)
    # Diffusion (MONAI: squared derivatives summed over directions, averaged over components and voxels): each
    # displacement component changes by 0.1 per voxel along its own axis only.
    assert float(mse(image, image, affine_field)) == pytest.approx(2.0 * 0.1**2, rel=1e-4)
    with pytest.raises(ConfigError, match="similarity"):
        RegistrationLoss(similarity="ncc")


# ---------------------------------------------------------------------------------------- pretrained encoders


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, object]:
    """A tiny pretrained encoder saved in three layouts: official SSL head, DDP copy and our training checkpoint."""
    torch.manual_seed(1234)
    encoder = SwinEncoder(in_channels=1, feature_size=12)
    with torch.no_grad():  # distinctive values, unlike any fresh initialisation
        for tensor in encoder.state_dict().values():
            tensor.add_(torch.rand_like(tensor.float()).to(tensor.dtype))
    state = {key: value.clone() for key, value in encoder.state_dict().items()}
    folder = tmp_path_factory.mktemp("checkpoints")
    layouts = {
        "official": state,
        "ddp": {f"module.{key}": value for key, value in state.items()},
        "training": {"pretext": {f"backbone.{key}": value for key, value in state.items()},
                     "trainer": {"iteration": 10}},
    }
    paths = {}
    for name, content in layouts.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(content, paths[name])
    wide = SwinEncoder(in_channels=1, feature_size=24).state_dict()
    paths["feature_size_24"] = folder / "feature_size_24.pt"
    torch.save(wide, paths["feature_size_24"])
    return {"state": state, "paths": paths}


@pytest.mark.parametrize("task_type", ["segmentation", "classification", "registration"])
@pytest.mark.parametrize("layout", ["official", "ddp", "training"])
def test_pretrained_encoder_loads_into_every_network(pretrained, task_type, layout, capsys):
    network = build_task_network(make_task(task_type), size="tiny")
    expected = pretrained["state"]
    encoder_state = encoder_of(network).state_dict()
    assert set(encoder_state) == set(expected)  # the official key layout
    assert not torch.equal(encoder_state["swinViT.layers1.0.blocks.0.mlp.linear1.weight"],
                           expected["swinViT.layers1.0.blocks.0.mlp.linear1.weight"])

    # registration.json keeps the reference's choice: moving and fixed image are not two channels of one image
    adaptation = "none" if task_type == "registration" else "mean"
    report = initialize_from_pretrained(network, pretrained["paths"][layout], mode="finetune",
                                        channel_adaptation=adaptation)

    skipped = INPUT_CHANNEL_TENSORS if task_type == "registration" else set()  # 2 input channels vs 1 pretrained
    assert {name for name, _, _ in report.skipped_shape} == skipped
    assert len(report.loaded) == len(expected) - len(skipped) and not report.skipped_unexpected
    loaded_state = encoder_of(network).state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded_state[key], value) != (key in skipped), key
    # The weights went into the network itself, not into a copy.
    first_block = dict(network.named_parameters())
    name = next(key for key in first_block if key.endswith("swinViT.layers4.0.blocks.1.attn.qkv.weight"))
    assert torch.equal(first_block[name], expected["swinViT.layers4.0.blocks.1.attn.qkv.weight"])
    assert all(parameter.requires_grad for parameter in network.parameters())  # finetune trains everything
    assert report.decoder_loaded == [] and report.decoder_skipped == []  # an encoder alone: no decoder to speak of
    printed = capsys.readouterr().out
    assert f"loaded {len(report.loaded)}/{len(expected)} encoder tensors" in printed and "decoder" not in printed


@pytest.fixture(scope="module")
def vocomni(tmp_path_factory) -> dict[str, object]:
    """A tiny VoComni-style checkpoint: a whole randomly initialised SwinUNETR-v2 (21 classes, feature size 12) under
    ``network_weights``; its 20 decoder tensors fit a 12-class task network, the 2 of its output layer do not."""
    torch.manual_seed(2024)
    whole = SwinUNETR(in_channels=1, out_channels=21, feature_size=12, use_v2=True).state_dict()
    path = tmp_path_factory.mktemp("vocomni") / "VoComni_tiny.pt"
    torch.save({"network_weights": whole}, path)
    return {"state": whole, "path": path}


def test_a_whole_swinunetr_checkpoint_fills_the_decoder_too(vocomni, capsys):
    network = build_task_network(make_task("segmentation"), size="tiny")
    output_before = {key: value.clone() for key, value in network.out.state_dict().items()}
    report = initialize_from_pretrained(network, vocomni["path"], mode="frozen")  # default: load_decoder=None

    assert len(report.loaded) == 145 and report.loaded_fraction == 1.0
    assert len(report.decoder_loaded) == 20 and all(name.startswith("decoder") for name in report.decoder_loaded)
    assert [name for name, _ in report.decoder_skipped] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert "shape (21, 12, 1, 1, 1) in the checkpoint, (12, 12, 1, 1, 1) in the model" in report.table()
    state = network.state_dict()
    for name in report.decoder_loaded:
        assert torch.equal(state[name], vocomni["state"][name]), name
    assert all(torch.equal(network.out.state_dict()[key], value) for key, value in output_before.items())
    decoder_parameters = list(decoder_of(network).parameters())
    assert decoder_parameters and all(parameter.requires_grad for parameter in decoder_parameters)  # it trains
    assert "loaded 145/145 encoder tensors" in report.summary()
    assert report.summary().endswith("; decoder: loaded 20 tensors, skipped 2")
    assert report.summary() in capsys.readouterr().out


def test_load_decoder_off_or_required(vocomni, pretrained):
    network = build_task_network(make_task("segmentation"), size="tiny")
    decoder_before = {key: value.clone() for key, value in decoder_of(network).state_dict().items()}
    report = initialize_from_pretrained(network, vocomni["path"], load_decoder=False)
    assert len(report.loaded) == 145 and report.decoder_loaded == []
    assert len(report.decoder_skipped) == 22 and {why for _, why in report.decoder_skipped} == {"load_decoder is off"}
    assert all(torch.equal(decoder_of(network).state_dict()[key], value) for key, value in decoder_before.items())

    # Required: an encoder-only checkpoint is refused before anything is loaded.
    fresh = build_task_network(make_task("segmentation"), size="tiny")
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="holds no decoder"):
        initialize_from_pretrained(fresh, pretrained["paths"]["official"], load_decoder=True)
    assert all(torch.equal(before[key], value) for key, value in fresh.state_dict().items())
    assert len(initialize_from_pretrained(fresh, vocomni["path"], load_decoder=True).decoder_loaded) == 20

    classifier = build_task_network(make_task("classification"), size="tiny")
    assert decoder_of(classifier) is None
    with pytest.raises(ConfigError, match="no SwinUNETR decoder"):
        initialize_from_pretrained(classifier, vocomni["path"], load_decoder=True)
    assert initialize_from_pretrained(classifier, vocomni["path"]).decoder_loaded == []  # default: nothing to fill


def test_frozen_mode_freezes_exactly_the_encoder(pretrained):
    network = build_task_network(make_task("segmentation"), size="tiny")
    initialize_from_pretrained(network, pretrained["paths"]["official"], mode="frozen")
    encoder_parameters = {id(parameter) for parameter in encoder_of(network).parameters()}
    for name, parameter in network.named_parameters():
        assert parameter.requires_grad == (id(parameter) not in encoder_parameters), name
    assert any(name.startswith("decoder1.") and p.requires_grad for name, p in network.named_parameters())
    assert not any(name.startswith("swinViT.") and p.requires_grad for name, p in network.named_parameters())


def test_linear_probe_trains_only_the_final_linear_layer(pretrained):
    network = build_task_network(make_task("classification"), size="tiny")
    initialize_from_pretrained(network, pretrained["paths"]["training"], mode="linear_probe")
    trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    assert trainable == {"head.weight", "head.bias"}

    segmentation = build_task_network(make_task("segmentation"), size="tiny")
    with pytest.raises(ConfigError, match="linear_probe"):
        initialize_from_pretrained(segmentation, pretrained["paths"]["official"], mode="linear_probe")


def test_scratch_and_mode_errors(pretrained):
    network = build_task_network(make_task("classification"), size="tiny")
    before = {key: value.clone() for key, value in network.state_dict().items()}
    assert initialize_from_pretrained(network, None, mode="scratch") is None
    assert initialize_from_pretrained(network, "scratch", mode="scratch") is None
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())
    with pytest.raises(ConfigError, match="scratch"):
        initialize_from_pretrained(network, pretrained["paths"]["official"], mode="scratch")
    with pytest.raises(ConfigError, match="needs a pretrained checkpoint"):
        initialize_from_pretrained(network, None, mode="finetune")
    with pytest.raises(ConfigError, match="unknown"):
        initialize_from_pretrained(network, pretrained["paths"]["official"], mode="partial")


def test_checkpoint_of_another_feature_size_is_refused_and_changes_nothing(pretrained):
    network = build_task_network(make_task("segmentation"), size="tiny")
    before = {key: value.clone() for key, value in network.state_dict().items()}
    with pytest.raises(CheckpointError, match="feature_size"):
        initialize_from_pretrained(network, pretrained["paths"]["feature_size_24"])
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())


# -------------------------------------------------------------------------------------------------------- metrics


def test_segmentation_dice_matches_hand_computed_values():
    # Two volumes of 2 x 2 x 2 voxels, classes 0 (background), 1, 2; flattened in C order.
    label = torch.tensor([[1, 1, 1, 0, 2, 2, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]).reshape(2, 1, 2, 2, 2)
    prediction = torch.tensor([[1, 1, 0, 0, 2, 2, 2, 1], [1, 0, 0, 0, 0, 0, 0, 0]]).reshape(2, 1, 2, 2, 2)
    # Volume 1: class 1 |A∩B| = 2 of 3 + 3 -> 4/6; class 2: 2 of 2 + 3 -> 4/5. Volume 2: class 1 -> 1, class 2
    # absent from the ground truth (NaN, left out of the means). The mean is over volumes of their class means.
    expected_class_1 = (4 / 6 + 1.0) / 2
    expected_class_2 = 4 / 5
    expected_mean = ((4 / 6 + 4 / 5) / 2 + 1.0) / 2

    metrics = segmentation_metrics(prediction, label, num_classes=3, class_names=("liver", "spleen"))
    assert metrics == pytest.approx({"dice": expected_mean, "dice/liver": expected_class_1,
                                     "dice/spleen": expected_class_2})
    logits = 5.0 * torch.nn.functional.one_hot(prediction[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    assert segmentation_metrics(logits, label, num_classes=3) == pytest.approx(
        {"dice": expected_mean, "dice/class_1": expected_class_1, "dice/class_2": expected_class_2})

    only_background = segmentation_metrics(torch.zeros_like(label), torch.zeros_like(label), num_classes=3)
    assert all(np.isnan(value) for value in only_background.values())


def test_classification_auc_and_accuracy_match_a_hand_example():
    # Scores 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1: 3 of the 4 (positive, negative) pairs are ordered -> 0.75.
    probability = torch.tensor([0.1, 0.4, 0.35, 0.8])
    logits = torch.log(probability / (1 - probability))[:, None]
    label = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None]
    assert classification_metrics(logits, label) == pytest.approx({"auc": 0.75, "accuracy": 0.75})

    three_classes = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert classification_metrics(three_classes, torch.tensor([0, 1, 2, 2])) == pytest.approx(
        {"auc": (1.0 + 1.0 + 1.0) / 3, "accuracy": 0.75})


def grid(shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates [3, X, Y, Z]."""
    return torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in shape), indexing="ij"))


def test_jacobian_determinant_of_identity_and_affine_fields():
    assert torch.equal(jacobian_determinant(torch.zeros(2, 3, 5, 6, 7)), torch.ones(2, 5, 6, 7))

    matrix = torch.tensor([[1.2, 0.1, 0.0], [0.05, 0.9, 0.2], [0.1, -0.1, 1.1]])
    ddf = torch.einsum("ij,jxyz->ixyz", matrix - torch.eye(3), grid((5, 6, 7))) + torch.tensor([2.0, -1.0, 0.5])[
        :, None, None, None]  # x -> A x + t
    determinant = jacobian_determinant(ddf)
    assert determinant.shape == (5, 6, 7)
    assert torch.allclose(determinant, torch.tensor(float(np.linalg.det(matrix.double().numpy()))), atol=1e-5)
    assert float(non_positive_jacobian_fraction(ddf)) == 0.0


def test_non_positive_jacobian_fraction_of_a_folding_field():
    # u_x = -1.5 x in the lower half of z: there d(x + u_x)/dx = -0.5 (folded); the Jacobian stays triangular,
    # so its determinant is that diagonal entry exactly: -0.5 in half the voxels, 1 in the other half.
    ddf = torch.zeros(1, 3, 6, 4, 4)
    ddf[0, 0, :, :, :2] = -1.5 * grid((6, 4, 2))[0]
    determinant = jacobian_determinant(ddf)
    assert torch.allclose(determinant[..., :2], torch.tensor(-0.5)) and torch.allclose(determinant[..., 2:],
                                                                                       torch.tensor(1.0))
    assert non_positive_jacobian_fraction(ddf).tolist() == [0.5]


def test_registration_metrics_warp_the_moving_labels():
    fixed_label = torch.zeros(1, 1, 8, 8, 8)
    fixed_label[..., 2:5, 2:6, 2:6] = 1
    moving_label = torch.roll(fixed_label, shifts=1, dims=2)  # the structure moved one voxel along x
    ddf = torch.zeros(1, 3, 8, 8, 8)
    assert registration_metrics(ddf, moving_label, fixed_label, num_classes=2)["dice/class_1"] == pytest.approx(
        2 * 2 / (3 + 3))
    ddf[:, 0] = 1.0  # warped(x) = moving(x + 1): exactly undoes the shift
    metrics = registration_metrics(ddf, moving_label, fixed_label, num_classes=2, class_names=("organ",))
    assert metrics == pytest.approx({"dice": 1.0, "dice/organ": 1.0, "non_positive_jacobian": 0.0})


@pytest.mark.parametrize("task_id, raw, converted", [
    ("mm-whs-ct", [0, 205, 420, 850], [0, 1, 2, 7]),   # MM-WHS codes -> 1..7
    ("brats21", [0, 1, 2, 4], [0, 1, 2, 3]),           # BraTS 1, 2, 4 -> 1, 2, 3
    ("panorama", [0, 3, 6, 7, 9], [0, 3, 6, 0, 0]),    # labels above 6 -> 0
    ("lndb", [0, 1, 2, 5], [0, 1, 1, 1]),              # any nodule label -> 1
    ("btcv", [0, 7, 13], [0, 7, 13]),                  # no remap
])
def test_reference_label_conversions(task_id, raw, converted):
    from voco.benchmark.registry import get_task
    from voco.benchmark.transforms import _label_remap_steps

    item = {"label": torch.tensor(raw, dtype=torch.float32).view(1, -1, 1, 1)}
    for step in _label_remap_steps(get_task(task_id), "label"):
        item = step(item)
    assert torch.as_tensor(item["label"]).flatten().tolist() == converted
