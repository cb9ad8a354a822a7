"""The anatomy of one synthetic abdominal CT phantom: the trunk and its organs in HU with a label map (`make_phantom`);
see `voco.data.phantoms` for the whole description."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from voco.data.phantoms.reports import phantom_report
from voco.errors import ConfigError

PHANTOM_CLASSES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "stomach",
    6: "aorta",
    7: "inferior_vena_cava",
    8: "spine",
    9: "hip_bones",
    10: "bladder",
    11: "lesion",
}
CLASS_INDEX: dict[str, int] = {name: index for index, name in PHANTOM_CLASSES.items()}
LESION_ORGANS = ("liver", "kidney_left", "kidney_right")

# The eight axis codes that differ by flips only; `ALL_ORIENTATIONS` adds the permutations.
DEFAULT_ORIENTATIONS = ("RAS", "LAS", "RPS", "LPS", "RAI", "LAI", "RPI", "LPI")
ALL_ORIENTATIONS = tuple("".join(letters) for axes in itertools.permutations(("RL", "AP", "SI"))
                         for letters in itertools.product(*axes))
DEFAULT_SHAPE_RANGE = ((64, 112), (64, 112), (32, 80))  # voxels along left-right, posterior-anterior, inferior-superior
DEFAULT_IN_PLANE_SPACING_RANGE = (0.8, 2.0)  # mm
DEFAULT_SLICE_SPACING_RANGE = (1.5, 5.0)  # mm
DEFAULT_NOISE_RANGE = (10.0, 20.0)  # standard deviation of the Gaussian noise, HU

AIR_HU = -1000.0
# Bumped whenever the generator changes what a seed gives, so `ensure_phantoms` rebuilds old sets.
PHANTOM_VERSION = 1


@dataclass
class Phantom:
    """One synthetic CT volume and what is known about it.

    Attributes:
        image: float32 HU values [X, Y, Z] in the voxel order of `orientation`.
        label: uint8 class indices of `PHANTOM_CLASSES`, same shape as `image`.
        affine: 4x4 voxel-to-world matrix (RAS+ millimetres, as in NIfTI).
        spacing: voxel size in mm along the three voxel axes of `image`.
        orientation: the axis code of the voxel axes, e.g. "LPS" (what `nibabel.aff2axcodes(affine)` gives).
        attributes: facts for classification: {"lesion", "lesion_count", "lesion_organs", "enlarged_spleen"}.
        report: a templated radiology report derived from the content.
        lesion_counts: lesions painted (visible on this grid) per organ of `LESION_ORGANS`.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    orientation: str
    attributes: dict[str, Any] = field(default_factory=dict)
    report: str = ""
    lesion_counts: dict[str, int] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(size) for size in self.image.shape)

    def save(self, image_path: str | os.PathLike, label_path: str | os.PathLike | None = None) -> None:
        """Write the image as int16 HU NIfTI (and the label map as uint8 NIfTI) with the phantom's affine."""
        import nibabel

        hounsfield = np.clip(np.rint(self.image), -1024, 3071).astype(np.int16)
        nibabel.save(_nifti(nibabel, hounsfield, self.affine), str(image_path))
        if label_path is not None:
            nibabel.save(_nifti(nibabel, self.label.astype(np.uint8), self.affine), str(label_path))


def _nifti(nibabel: Any, array: np.ndarray, affine: np.ndarray) -> Any:
    image = nibabel.Nifti1Image(array, affine)
    # Both qform and sform as "scanner" coordinates, so ITK and nibabel readers agree on the orientation.
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


# ---------------------------------------------------------------------------------------------------------------
# Anatomy


class _SmoothField:
    """A random smooth field of about unit variance over the normalised body coordinates (u, v, w).

    A sum of a few plane waves of low frequency: defined in body coordinates rather than voxels, so the same
    seed deforms an organ the same way whatever the voxel grid.
    """

    def __init__(self, rng: np.random.Generator, waves: int = 5, frequency: float = 2.5) -> None:
        self.frequencies = rng.normal(0.0, frequency, size=(waves, 3)).astype(np.float32)
        self.phases = rng.uniform(0.0, 2 * np.pi, size=waves).astype(np.float32)

    def __call__(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        total = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), np.float32)
        for (fu, fv, fw), phase in zip(self.frequencies, self.phases):
            total += np.cos(fu * u + fv * v + fw * w + phase)
        # Clipped so that a structure never reaches past the window `_Canvas.window` gives it.
        return np.clip(total * np.float32(math.sqrt(2.0 / len(self.phases))), -3.0, 3.0)


@dataclass
class _Canvas:
    """The image and label map in RAS voxel order, with each axis' normalised body coordinate.

    u = left-right (+ towards the patient's right, 1 at the body surface), v = posterior-anterior (+ anterior,
    1 at the body surface), w = inferior-superior (+ superior, about -1..1 over the field of view).
    """

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    millimetres_per_unit: np.ndarray  # the length in mm of one normalised unit along u, v, w
    spacing: np.ndarray  # voxel size in mm along u, v, w
    image: np.ndarray
    label: np.ndarray

    def window(self, center: Sequence[float], half_size: Sequence[float]) -> tuple[slice, slice, slice]:
        """The voxel slices that cover the normalised box center ± half_size (coordinates grow with index)."""
        return tuple(
            slice(int(np.searchsorted(axis, c - h, "left")), int(np.searchsorted(axis, c + h, "right")))
            for axis, c, h in zip((self.u, self.v, self.w), center, half_size)
        )

    def coordinates(self, window: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable u [x,1,1], v [1,y,1], w [1,1,z] over a window."""
        return (self.u[window[0]][:, None, None], self.v[window[1]][None, :, None],
                self.w[window[2]][None, None, :])

    def paint(self, window: tuple[slice, slice, slice], mask: np.ndarray, hounsfield: float | np.ndarray,
              label: int | None = None, within: np.ndarray | None = None) -> np.ndarray:
        """Set HU (and the label) where `mask` holds inside `window`; returns the mask that was painted."""
        if within is not None:
            mask = mask & within[window]
        image, labels = self.image[window], self.label[window]  # views: writing them writes the canvas
        image[mask] = hounsfield[mask] if isinstance(hounsfield, np.ndarray) else hounsfield
        if label is not None:
            labels[mask] = label
        return mask

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float], roughness: float = 0.0,
                  deformation: _SmoothField | None = None, window: tuple[slice, slice, slice] | None = None
                  ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """An ellipsoid whose surface is pushed in and out by `deformation` (relative amplitude `roughness`).

        Computed over `window` when given (to combine it with another mask there), else over its own.
        """
        if window is None:
            reach = math.sqrt(1.0 + 3.0 * roughness)
            window = self.window(center, [radius * reach for radius in radii])
        u, v, w = self.coordinates(window)
        distance = (((u - center[0]) / radii[0]) ** 2 + ((v - center[1]) / radii[1]) ** 2
                    + ((w - center[2]) / radii[2]) ** 2)
        if deformation is None or roughness == 0.0:
            return window, distance < 1.0
        return window, distance < 1.0 + roughness * deformation(u, v, w)

    def tube(self, start: Sequence[float], end: Sequence[float], radius: float
             ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """A capsule of `radius` (normalised units) around the segment start→end."""
        low = np.minimum(start, end) - radius
        high = np.maximum(start, end) + radius
        window = self.window((low + high) / 2, (high - low) / 2)
        u, v, w = self.coordinates(window)
        direction = np.subtract(end, start, dtype=np.float32)
        along = ((u - start[0]) * direction[0] + (v - start[1]) * direction[1] + (w - start[2]) * direction[2])
        along = np.clip(along / float(direction @ direction), 0.0, 1.0)
        squared = ((u - start[0] - along * direction[0]) ** 2 + (v - start[1] - along * direction[1]) ** 2
                   + (w - start[2] - along * direction[2]) ** 2)
        return window, squared < radius ** 2


def _jitter(rng: np.random.Generator, center: Sequence[float], radii: Sequence[float], shift: float = 0.04,
            scale: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Move a structure a little and resize it a little: the variation between people."""
    return (np.asarray(center, np.float32) + rng.normal(0.0, shift, 3).astype(np.float32),
            np.asarray(radii, np.float32) * rng.uniform(1.0 - scale, 1.0 + scale, 3).astype(np.float32))


def _paint_anatomy(canvas: _Canvas, rng: np.random.Generator, lesion_probability: float,
                   enlarged_spleen_probability: float) -> tuple[dict[str, int], bool]:
    """Paint the trunk and its organs onto `canvas`; returns lesions painted per organ and the enlarged spleen.

    Every random number is drawn in the same order whatever the grid, so a seed gives the same anatomy on
    any voxel grid. Later structures paint over earlier ones.
    """
    whole = (slice(None),) * 3
    u, v, w = canvas.coordinates(whole)

    # Trunk: skin, subcutaneous fat of varying thickness, muscle wall; the abdominal cavity inside.
    outline, fat_thickness_field = _SmoothField(rng, 4, 1.5), _SmoothField(rng, 4, 2.0)
    radial = np.sqrt(u ** 2 + v ** 2) * (1.0 + 0.02 * outline(u, v, w))
    skin = 2.0 / float(canvas.millimetres_per_unit[:2].mean())  # about 2 mm
    fat_thickness = rng.uniform(0.05, 0.16) * (1.0 + 0.35 * fat_thickness_field(u, v, w))
    muscle_thickness = rng.uniform(0.05, 0.08)
    skin_hu, fat_hu, muscle_hu = rng.uniform(10, 50), rng.uniform(-115, -85), rng.uniform(35, 55)
    body = radial < 1.0
    under_fat = radial < 1.0 - skin - fat_thickness
    cavity = radial < 1.0 - skin - fat_thickness - muscle_thickness
    canvas.paint(whole, body, skin_hu)
    canvas.paint(whole, radial < 1.0 - skin, fat_hu)
    canvas.paint(whole, under_fat, muscle_hu)

    # Cavity filler: visceral fat and bowel loops, with gas pockets in the bowel.
    bowel_field, gas_field = _SmoothField(rng, 10, 7.0), _SmoothField(rng, 8, 10.0)
    bowel_threshold, bowel_hu, gas_hu = rng.uniform(-0.3, 0.3), rng.uniform(10, 40), rng.uniform(-1000, -850)
    bowel = bowel_field(u, v, w) > bowel_threshold
    canvas.paint(whole, cavity, rng.uniform(-110, -80))
    canvas.paint(whole, bowel, bowel_hu, within=cavity)
    canvas.paint(whole, bowel & (gas_field(u, v, w) > 1.8), gas_hu, within=cavity)

    # Paraspinal muscles behind the spine (under the fat), psoas muscles beside the lower spine.
    for side in (1.0, -1.0):
        center, radii = _jitter(rng, (0.2 * side, -0.76, 0.0), (0.17, 0.15, 10.0), shift=0.02)
        canvas.paint(*canvas.ellipsoid(center, radii), muscle_hu, within=under_fat)
        start, _ = _jitter(rng, (0.14 * side, -0.45, 0.35), (1, 1, 1), shift=0.02)
        end, _ = _jitter(rng, (0.3 * side, -0.4, -1.2), (1, 1, 1), shift=0.02)
        canvas.paint(*canvas.tube(start, end, rng.uniform(0.08, 0.11)), muscle_hu, within=cavity)

    # Bladder (urine), inferior and anterior; its fill varies.
    center, radii = _jitter(rng, (0.0, 0.3, -0.85), (0.26, 0.22, 0.22))
    radii *= rng.uniform(0.7, 1.2)
    canvas.paint(*canvas.ellipsoid(center, radii, 0.1, _SmoothField(rng)), rng.uniform(0, 15),
                 CLASS_INDEX["bladder"], within=cavity)

    # Stomach, left upper anterior: a wall around fluid, with gas on top of the fluid in a supine patient,
    # that is anteriorly.
    center, radii = _jitter(rng, (-0.38, 0.3, 0.55), (0.28, 0.25, 0.28))
    wall_hu, fluid_hu = rng.uniform(30, 50), rng.uniform(0, 20)
    gas_level = center[1] + radii[1] * rng.uniform(0.2, 0.6)
    window, stomach = canvas.ellipsoid(center, radii, 0.15, _SmoothField(rng))
    stomach = canvas.paint(window, stomach, wall_hu, CLASS_INDEX["stomach"], within=cavity)
    _, lumen = canvas.ellipsoid(center, radii * 0.8, window=window)
    canvas.paint(window, stomach & lumen, fluid_hu)
    canvas.paint(window, stomach & lumen & (canvas.coordinates(window)[1] > gas_level), AIR_HU)

    # Spleen, left upper posterior; an enlarged spleen is bigger and reaches lower and further forward.
    enlarged_spleen = bool(rng.uniform() < enlarged_spleen_probability)
    center, radii = _jitter(rng, (-0.58, -0.28, 0.6), (0.18, 0.3, 0.24))
    growth = rng.uniform(1.35, 1.6)  # drawn either way, so the rest of the anatomy does not depend on it
    growth = growth if enlarged_spleen else 1.0
    center = center + np.float32([0.1, 0.16, -0.3]) * (growth - 1.0)
    canvas.paint(*canvas.ellipsoid(center, radii * growth, 0.15, _SmoothField(rng)), rng.uniform(40, 55),
                 CLASS_INDEX["spleen"], within=cavity)

    # Liver, right upper, with a left lobe reaching across the midline in front of the stomach.
    liver_hu, liver_deformation = rng.uniform(50, 70), _SmoothField(rng)
    right_lobe = _jitter(rng, (0.42, 0.02, 0.55), (0.52, 0.62, 0.45))
    left_lobe = _jitter(rng, (-0.05, 0.38, 0.62), (0.32, 0.25, 0.25))
    for center, radii in (right_lobe, left_lobe):
        canvas.paint(*canvas.ellipsoid(center, radii, 0.12, liver_deformation), liver_hu, CLASS_INDEX["liver"],
                     within=cavity)

    # Kidneys, posterior lateral, the right one lower (under the liver): cortex around the medulla, which
    # lies towards the hilum (medially).
    cortex_hu, medulla_hu = rng.uniform(120, 170), rng.uniform(30, 70)
    kidneys = {}
    for name, side, height in (("kidney_right", 1.0, 0.08), ("kidney_left", -1.0, 0.2)):
        center, radii = _jitter(rng, (0.45 * side, -0.38, height), (0.16, 0.18, 0.34), scale=0.08)
        deformation = _SmoothField(rng)
        window, kidney = canvas.ellipsoid(center, radii, 0.1, deformation)
        kidney = canvas.paint(window, kidney, cortex_hu, CLASS_INDEX[name], within=cavity)
        _, medulla = canvas.ellipsoid(center - np.float32([0.03 * side, 0, 0]), radii * 0.6, window=window)
        canvas.paint(window, kidney & medulla, medulla_hu)
        kidneys[name] = (center, radii)

    # Aorta left of the midline in front of the spine, splitting into the iliac arteries; the IVC on the right.
    aorta_hu, vein_hu = rng.uniform(120, 220), rng.uniform(70, 130)
    bifurcation, _ = _jitter(rng, (-0.05, -0.28, -0.35), (1, 1, 1), shift=0.02)
    aorta_radius, vein_radius = rng.uniform(0.07, 0.09), rng.uniform(0.08, 0.1)
    vein, _ = _jitter(rng, (0.16, -0.3, -0.4), (1, 1, 1), shift=0.02)
    canvas.paint(*canvas.tube(bifurcation, bifurcation + np.float32([0, 0, 3]), aorta_radius), aorta_hu,
                 CLASS_INDEX["aorta"], within=body)
    for side in (1.0, -1.0):
        end = bifurcation + np.float32([0.3 * side + 0.05, 0.1, -1.0])
        canvas.paint(*canvas.tube(bifurcation, end, aorta_radius * 0.7), aorta_hu, CLASS_INDEX["aorta"], within=body)
    canvas.paint(*canvas.tube(vein, vein + np.float32([-0.02, 0.03, 3]), vein_radius), vein_hu,
                 CLASS_INDEX["inferior_vena_cava"], within=body)

    # Spine: vertebral bodies (cortex around cancellous bone) with discs between them, the arch around the
    # spinal canal and the spinous process behind it.
    spine = CLASS_INDEX["spine"]
    cortex_hu, cancellous_hu = rng.uniform(700, 1000), rng.uniform(300, 450)
    spine_center, spine_radii = _jitter(rng, (0.0, -0.5, 0.0), (0.13, 0.12, 10.0), shift=0.015, scale=0.08)
    level_height, level_phase = rng.uniform(0.33, 0.45), rng.uniform(0, 1)
    disc_height, disc_hu, canal_hu = level_height * rng.uniform(0.15, 0.22), rng.uniform(70, 110), rng.uniform(5, 25)
    window, vertebral_body = canvas.ellipsoid(spine_center, spine_radii)
    canvas.paint(window, vertebral_body, cortex_hu, spine, within=body)
    _, cancellous = canvas.ellipsoid(spine_center, spine_radii * np.float32([0.75, 0.75, 1]), window=window)
    canvas.paint(window, cancellous, cancellous_hu)
    level = (canvas.coordinates(window)[2] / level_height + level_phase) % 1.0
    canvas.paint(window, vertebral_body & (level * level_height < disc_height), disc_hu)
    canal_center = spine_center + np.float32([0, -spine_radii[1] - 0.07, 0])
    canvas.paint(*canvas.ellipsoid(canal_center, (0.12, 0.1, 10.0)), cortex_hu, spine, within=body)
    canvas.paint(*canvas.ellipsoid(canal_center + np.float32([0, -0.1, 0]), (0.035, 0.09, 10.0)), cortex_hu, spine,
                 within=body)
    canvas.paint(*canvas.ellipsoid(canal_center, (0.065, 0.055, 10.0)), canal_hu, 0)

    # Hip bones, inferior lateral: iliac wings of cortex around marrow.
    for side in (1.0, -1.0):
        center, radii = _jitter(rng, (0.58 * side, -0.3, -0.8), (0.12, 0.32, 0.42), shift=0.03, scale=0.08)
        deformation = _SmoothField(rng)
        window, wing = canvas.ellipsoid(center, radii, 0.05, deformation)
        canvas.paint(window, wing, cortex_hu, CLASS_INDEX["hip_bones"], within=body)
        _, marrow = canvas.ellipsoid(center, radii * np.float32([0.45, 0.8, 0.8]), 0.05, deformation, window=window)
        canvas.paint(window, wing & marrow, cancellous_hu * 0.7)

    # Lesions: small hypodense spheres inside the liver or a kidney, only where that organ is.
    lesion_counts = {organ: 0 for organ in LESION_ORGANS}
    if rng.uniform() < lesion_probability:
        organs = {"liver": right_lobe, **kidneys}
        for _ in range(int(rng.integers(1, 4))):
            organ = str(rng.choice(LESION_ORGANS, p=[0.6, 0.2, 0.2]))
            center, radii = organs[organ]
            direction = rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * rng.uniform() ** (1 / 3) * 0.5 * radii  # in the core
            radius_mm = rng.uniform(4.0, 10.0)
            hounsfield = rng.uniform(0, 35) if organ == "liver" else rng.uniform(0, 20)
            radius_mm = max(radius_mm, 0.75 * float(canvas.spacing.max()))  # about a voxel across on any grid
            window, sphere = canvas.ellipsoid(center + offset, radius_mm / canvas.millimetres_per_unit)
            painted = canvas.paint(window, sphere & (canvas.label[window] == CLASS_INDEX[organ]), hounsfield,
                                   CLASS_INDEX["lesion"])
            lesion_counts[organ] += int(painted.any())
    return lesion_counts, enlarged_spleen


# ---------------------------------------------------------------------------------------------------------------
# One phantom


def _check_range(name: str, value: Sequence[float], low: float) -> tuple[float, float]:
    try:
        first, second = (float(item) for item in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} is {value!r}; give two numbers [low, high].") from None
    if not low <= first <= second:
        raise ConfigError(f"{name} is {value!r}; give [low, high] with {low} <= low <= high.")
    return first, second


def _check_orientation(code: str) -> str:
    code = str(code).upper()
    if code not in ALL_ORIENTATIONS:
        raise ConfigError(f"orientation {code!r} is not an axis code; use three letters, one of R/L, A/P and S/I "
                          f"each, such as 'RAS' or 'LPS'.")
    return code


def make_phantom(
    seed: int | Sequence[int],
    *,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    shape_range: Sequence[Sequence[int]] = DEFAULT_SHAPE_RANGE,
    in_plane_spacing_range: Sequence[float] = DEFAULT_IN_PLANE_SPACING_RANGE,
    slice_spacing_range: Sequence[float] = DEFAULT_SLICE_SPACING_RANGE,
    orientations: Sequence[str] = DEFAULT_ORIENTATIONS,
    lesion_probability: float = 0.5,
    enlarged_spleen_probability: float = 0.3,
    noise_range: Sequence[float] = DEFAULT_NOISE_RANGE,
    field_of_view_range: Sequence[Sequence[float]] | None = None,
) -> Phantom:
    """Make one synthetic abdominal CT phantom, deterministically for `seed`.

    Args:
        seed: an int, or a sequence of ints such as (set_seed, index) (a `numpy.random.SeedSequence` entropy).
        shape: voxels along the anatomical axes (left-right, posterior-anterior, inferior-superior); drawn from
            `shape_range` when None. The stored image has these sizes in its own voxel order.
        spacing: voxel size in mm along the same anatomical axes; drawn (the same in-plane spacing for both
            in-plane axes) from `in_plane_spacing_range` and `slice_spacing_range` when None.
        orientation: axis code of the stored voxel order, e.g. "LPS"; drawn from `orientations` when None.
        lesion_probability: chance that the phantom has one to three lesions (liver or kidneys).
        enlarged_spleen_probability: chance of an enlarged spleen.
        noise_range: range of the standard deviation of the Gaussian noise, HU.
        field_of_view_range: when given, three [low, high] ranges in mm: the field of view (and so the body) is
            drawn in mm and the shape follows from the spacing, as on a scanner, instead of from `shape_range`.
            Without it the body fills whatever grid is drawn, so its size in mm varies with the spacing (up to
            4x per axis with the default ranges): fine for pretraining, too hard for a few-case segmentation.

    The anatomy depends only on the seed, so the same seed with another shape, spacing or orientation gives
    the same body on another grid.
    """
    if not 0.0 <= lesion_probability <= 1.0 or not 0.0 <= enlarged_spleen_probability <= 1.0:
        raise ConfigError(f"lesion_probability {lesion_probability} and enlarged_spleen_probability "
                          f"{enlarged_spleen_probability} must be probabilities; give numbers in [0, 1].")
    geometry_rng, orientation_rng, anatomy_rng, noise_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4))

    # Grid: drawn always, so that fixing one of shape/spacing/orientation leaves the others as they were.
    if len(shape_range) != 3:
        raise ConfigError(f"shape_range is {shape_range!r}; give three [low, high] pairs, one per axis.")
    ranges = [_check_range(f"shape_range[{axis}]", shape_range[axis], 8) for axis in range(3)]
    drawn_shape = [int(geometry_rng.integers(int(low), int(high) + 1)) for low, high in ranges]
    in_plane = geometry_rng.uniform(*_check_range("in_plane_spacing_range", in_plane_spacing_range, 0.01))
    slice_spacing = geometry_rng.uniform(*_check_range("slice_spacing_range", slice_spacing_range, 0.01))
    body_width, body_depth, axial_extent, axial_shift = geometry_rng.uniform(
        [0.8, 0.62, 0.9, -0.08], [0.92, 0.8, 1.05, 0.08])
    noise_std = geometry_rng.uniform(*_check_range("noise_range", noise_range, 0.0))
    if field_of_view_range is not None:  # drawn last, so that the other draws stay those of the same seed without it
        if len(field_of_view_range) != 3:
            raise ConfigError(f"field_of_view_range is {field_of_view_range!r}; give three [low, high] pairs in mm.")
        millimetres = [geometry_rng.uniform(*_check_range(f"field_of_view_range[{axis}]", field_of_view_range[axis],
                                                          1.0)) for axis in range(3)]
        drawn_shape = [max(8, int(round(size / step))) for size, step in
                       zip(millimetres, (in_plane, in_plane, slice_spacing))]
    codes = [_check_orientation(code) for code in orientations]
    if not codes:
        raise ConfigError("orientations is empty; give at least one axis code such as 'RAS'.")
    drawn_orientation = codes[int(orientation_rng.integers(len(codes)))]

    shape = [int(size) for size in (shape if shape is not None else drawn_shape)]
    spacing = [float(size) for size in (spacing if spacing is not None else (in_plane, in_plane, slice_spacing))]
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"phantom shape {shape} is not three sizes of at least 8 voxels; give e.g. [48, 48, 24].")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"phantom spacing {spacing} is not three positive sizes in mm; give e.g. [1.5, 1.5, 3].")
    orientation = _check_orientation(orientation) if orientation is not None else drawn_orientation

    # Millimetres from the volume centre along each anatomical axis, and the body's size in mm.
    field_of_view = np.asarray(shape, np.float64) * spacing
    half_width = body_width * field_of_view[0] / 2
    half_depth = min(body_depth * field_of_view[1] / 2, 0.95 * half_width)  # a trunk is wider than deep
    half_length = axial_extent * field_of_view[2] / 2
    millimetres_per_unit = np.float32([half_width, half_depth, half_length])
    axes = [((np.arange(size) - (size - 1) / 2) * step).astype(np.float32) for size, step in zip(shape, spacing)]
    canvas = _Canvas(u=axes[0] / millimetres_per_unit[0], v=axes[1] / millimetres_per_unit[1],
                     w=axes[2] / millimetres_per_unit[2] + np.float32(axial_shift),
                     millimetres_per_unit=millimetres_per_unit, spacing=np.float32(spacing),
                     image=np.full(shape, AIR_HU, np.float32), label=np.zeros(shape, np.uint8))
    lesion_counts, enlarged_spleen = _paint_anatomy(canvas, anatomy_rng, lesion_probability,
                                                    enlarged_spleen_probability)

    # Mild blur (partial volume of a reconstruction kernel), then the scanner's noise.
    image = ndimage.gaussian_filter(canvas.image, sigma=0.6, mode="nearest")
    image += noise_rng.normal(0.0, noise_std, size=shape).astype(np.float32)
    np.clip(image, -1024.0, 3071.0, out=image)

    # Store in the target orientation: reorder the RAS arrays and fold the same change into the affine.
    import nibabel.orientations as orientations_module

    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing  # the volume centre at the world origin
    transform = orientations_module.ornt_transform(orientations_module.axcodes2ornt(("R", "A", "S")),
                                                   orientations_module.axcodes2ornt(tuple(orientation)))
    affine = ras_affine @ orientations_module.inv_ornt_aff(transform, shape)
    image = np.ascontiguousarray(orientations_module.apply_orientation(image, transform), np.float32)
    label = np.ascontiguousarray(orientations_module.apply_orientation(canvas.label, transform), np.uint8)

    lesion_organs = [organ for organ in LESION_ORGANS if lesion_counts[organ]]
    attributes = {"lesion": bool(lesion_organs), "lesion_count": int(sum(lesion_counts.values())),
                  "lesion_organs": lesion_organs, "enlarged_spleen": enlarged_spleen}
    return Phantom(image=image, label=label, affine=affine,
                   spacing=tuple(float(size) for size in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))),
                   orientation=orientation, attributes=attributes,
                   report=phantom_report(lesion_counts, enlarged_spleen), lesion_counts=dict(lesion_counts))
