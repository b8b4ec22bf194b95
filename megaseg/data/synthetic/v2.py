"""Synthetic tasks v2: objects on backgrounds, per-subject geometry, real label maps.

Generator v1 (:mod:`megaseg.data.synthetic.v1`) makes space-filling label maps only, and a network
trained on it fails a bright disk on a noisy background. v2 adds what real multi-patient data
has (issue #13). Each task is one of three *kinds*, drawn per task:

- ``objects``: one to three labelled structures on an unlabelled background (map value 0),
  bright or dark, optionally with unlabelled distractors (sometimes of the target's own
  intensity, so shape must decide). Shapes: discs/ellipses, blobs (radial Fourier
  perturbations), rings, thin tubes along smooth curves, and several connected components of
  one label; sizes from a few pixels to most of the image. Objects move and change size
  between subjects (task-level jitter).
- ``anatomy``: v1's Perlin-like space-filling anatomy, under v2's geometry and appearance
  (outside the anatomy's field of view is background).
- ``real``: label-to-image on real label maps given to the generator (e.g.
  :func:`mni152_label_maps`): random per-label intensities on a randomly deformed real map,
  so shapes are real and contrast is random. Without label maps this kind is not drawn.

Every subject has its own geometry, drawn within the task's ranges: zoom (x0.5-2, log-uniform),
rotation, shift, smooth elastic deformation, and (per task probability) a field-of-view crop
(zero outside a rectangle, as in a scanner's FOV). Appearance: per-class intensities with
per-subject jitter, smooth texture, a multiplicative bias field, anisotropic Gaussian blur,
resolution loss along one or both axes (down- then up-sampling), Gaussian or Rician noise,
min-max to [0, 1] (the FOV crop applied after).

Label convention: a label map holds 0 for background (never a task) and ``k + 1`` for label
``k`` of the task, ``k in [0, num_labels(task))``. ``batch(task, k, ...)`` is the binary task
"label k". The public API is v1's (``num_tasks``, ``config.num_subjects``, ``num_labels``,
``subjects``, ``batch``, ``example``, ``subject``, seeds), so
:class:`megaseg.data.tasks.SyntheticTaskSource` and the training data module take either.

Purity: everything is a function of ``(GENERATOR_VERSION, seed_offset + task, index, config,
label maps)``; every draw comes from a CPU ``torch.Generator`` seeded by a hash, per task and per
subject, so a subject does not depend on which others share the batch. v1 is untouched and
still reproduces its corpora (see ``tests/test_synthetic.py::test_generator_v1_output_is_pinned``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from megaseg.data.synthetic.base import TaskRange, blur_matrix, hash_seed, smooth_field
from megaseg.data.synthetic.v1 import SyntheticConfig, task_anatomy
from megaseg.paths import atomic_write

GENERATOR_VERSION = 2
KINDS = ("objects", "anatomy", "real")
SHAPES = ("disc", "blob", "ring", "tube", "components")

# Fixed sizes of the per-subject random vectors, so a subject's draws do not depend on the kind.
_MAX_CLASSES = 24  # background + labelled structures + distractors (or map labels)
_MAX_OBJECTS = 8  # labelled structures + distractors of an objects task
_MAX_COMPONENTS = 4
_OBJ_DRAWS = 4 + 2 * _MAX_COMPONENTS  # per object: scale, angle, 2 x jitter-free, centres
_NUM_UNIFORMS = 16
_CURVE_POINTS = 4  # cubic Bezier control points of a tube
_CURVE_SAMPLES = 24  # segments along a tube


@dataclass(frozen=True)
class SyntheticV2Config:
    """Parameters of the v2 task distribution. Lengths are in normalized coordinates (the image
    spans [-1, 1]); blur in pixels at 128 px (scaled with ``size``)."""

    size: int = 128
    num_subjects: int = 100
    kind_weights: tuple[float, float, float] = (0.6, 0.15, 0.25)  # objects, anatomy, real
    # objects kind
    max_structures: int = 3  # labelled structures per task
    max_distractors: int = 4
    radius_range: tuple[float, float] = (0.04, 0.7)  # log-uniform, object radius
    tube_width_range: tuple[float, float] = (0.012, 0.06)
    position_jitter_range: tuple[float, float] = (0.0, 0.25)  # per-subject object shift
    size_jitter_range: tuple[float, float] = (0.0, 0.35)  # per-subject log-size std
    min_contrast: float = 0.25  # |target - background| mean intensity, before noise
    # per-subject geometry (task draws a spread in [spread_range] scaling these)
    zoom_range: tuple[float, float] = (0.5, 2.0)  # log-uniform within the task's spread
    rotation_deg: float = 180.0
    aspect_jitter: float = 0.1  # log aspect ratio (pixel spacing) per subject
    shift: float = 0.2
    spread_range: tuple[float, float] = (0.2, 1.0)
    elastic_range: tuple[float, float] = (0.0, 0.04)  # displacement std
    elastic_grid: int = 5
    crop_prob_choices: tuple[float, ...] = (0.0, 0.0, 0.5)  # per task: P(a subject is cropped)
    crop_min_keep: float = 0.55  # the FOV keeps at least this share of each side
    # appearance
    intensity_jitter_range: tuple[float, float] = (0.0, 0.06)
    texture_range: tuple[float, float] = (0.0, 0.1)
    texture_grid: int = 12
    bias_strength_range: tuple[float, float] = (0.0, 0.7)
    bias_grid: int = 4
    blur_sigma_range: tuple[float, float] = (0.0, 2.0)  # pixels at 128 px, max per axis
    lowres_prob: float = 0.3  # per task: resolution loss on (per subject factor 1-4)
    lowres_max_factor: float = 4.0
    noise_std_range: tuple[float, float] = (0.0, 0.15)
    rician_prob: float = 0.3


@dataclass(frozen=True)
class _Object:
    shape: str
    label: int  # class value in the class map (1..K labelled, K+1.. distractors)
    centres: Tensor  # (C, 2) canonical centres of the components
    radius: float
    aspect: float
    angle: float
    wobble: Tensor  # (4, 2) blob Fourier amplitudes and phases for k = 2..5
    thickness: float  # ring thickness (fraction of radius)
    curve: Tensor  # (4, 2) tube control points
    width: float  # tube half width


@dataclass(frozen=True)
class _TaskV2:
    seed: int
    kind: str
    num_labels: int
    num_classes: int  # values 0 .. num_classes-1 in the class map
    means: Tensor  # (num_classes,) intensities
    objects: tuple[_Object, ...]
    map_index: int  # real kind: which label map
    position_jitter: float
    size_jitter: float
    spread: float
    zoom_lo: float
    zoom_hi: float
    elastic: float
    crop_prob: float
    intensity_jitter: float
    texture: float
    bias_strength: float
    blur_sigma: float
    lowres: bool
    noise_std: float
    rician: bool


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _loguniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_u(gen, math.log(lo), math.log(hi)))


def _choice(gen: torch.Generator, weights: Sequence[float]) -> int:
    w = torch.tensor(weights, dtype=torch.float64)
    return int(torch.multinomial(w / w.sum(), 1, generator=gen))


def _draw_object(gen: torch.Generator, shape: str, label: int, cfg: SyntheticV2Config) -> _Object:
    lo, hi = cfg.radius_range
    if shape == "components":
        hi = min(hi, 0.25)
    radius = _loguniform(gen, lo, hi)
    if shape == "ring":
        radius = max(radius, 0.1)
    count = 1
    if shape == "components":
        count = int(torch.randint(2, _MAX_COMPONENTS + 1, (), generator=gen))
    # Centres inside the central region so structures mostly stay in view.
    reach = max(0.05, 0.75 - radius)
    centres = (2 * torch.rand(_MAX_COMPONENTS, 2, generator=gen) - 1) * reach
    centres = centres[:count].clone()
    aspect = _loguniform(gen, 0.5, 2.0) if shape != "disc" or _u(gen, 0, 1) < 0.5 else 1.0
    angle = _u(gen, 0, math.pi)
    wobble_amp = _u(gen, 0.0, 0.25) if shape in ("blob", "components", "ring") else 0.0
    wobble = torch.stack(
        [
            wobble_amp * torch.rand(4, generator=gen) / torch.arange(1, 5),
            2 * math.pi * torch.rand(4, generator=gen),
        ],
        dim=1,
    )
    thickness = _u(gen, 0.15, 0.45)
    curve = (2 * torch.rand(_CURVE_POINTS, 2, generator=gen) - 1) * 0.8
    width = _loguniform(gen, *cfg.tube_width_range)
    if shape == "tube":  # its centre (where zoomed-in views look) is the curve's midpoint
        centres = (curve * torch.tensor([1.0, 3.0, 3.0, 1.0])[:, None] / 8).sum(0, keepdim=True)
    return _Object(shape, label, centres, radius, aspect, angle, wobble, thickness, curve, width)


@lru_cache(maxsize=65536)
def _task(seed: int, cfg: SyntheticV2Config, maps_key: str, num_maps: int) -> _TaskV2:
    gen = torch.Generator().manual_seed(hash_seed(seed, "v2-task"))
    weights = list(cfg.kind_weights)
    if num_maps == 0:
        weights[2] = 0.0
    kind = KINDS[_choice(gen, weights)]
    objects: list[_Object] = []
    map_index = 0
    if kind == "objects":
        num_labels = int(torch.randint(1, cfg.max_structures + 1, (), generator=gen))
        # Most tasks one structure: the simple case the sanity suite checks must dominate.
        if _u(gen, 0, 1) < 0.5:
            num_labels = 1
        num_distractors = int(torch.randint(0, cfg.max_distractors + 1, (), generator=gen))
        num_distractors = min(num_distractors, _MAX_OBJECTS - num_labels)
        for k in range(num_labels + num_distractors):
            shape = SHAPES[_choice(gen, (3, 3, 1.5, 1.5, 1.5))]
            objects.append(_draw_object(gen, shape, k + 1, cfg))
        num_classes = 1 + num_labels + num_distractors
        # Background, then targets bright or dark against it with a minimum contrast;
        # distractors either mimic a target's intensity or are random.
        bg = _u(gen, 0.15, 0.85)
        means = [bg]
        for _ in range(num_labels):
            sign = 1.0 if _u(gen, 0, 1) < 0.5 else -1.0
            means.append(bg + sign * _u(gen, cfg.min_contrast, 0.7))
        for _ in range(num_distractors):
            if _u(gen, 0, 1) < 0.5:
                means.append(means[1 + int(torch.randint(num_labels, (), generator=gen))])
            else:
                means.append(_u(gen, -0.3, 1.3))
        means_t = torch.tensor(means, dtype=torch.float32)
    elif kind == "anatomy":
        v1 = SyntheticConfig(min_labels=2, max_labels=10)
        num_labels = len(task_anatomy(seed, v1).offsets)
        num_classes = num_labels + 1
        means_t = torch.rand(num_classes, generator=gen)
    else:
        map_index = int(torch.randint(num_maps, (), generator=gen))
        num_labels = -1  # filled in by the caller, which knows the map
        num_classes = _MAX_CLASSES
        means_t = torch.rand(num_classes, generator=gen)
    spread = _u(gen, *cfg.spread_range)
    z_lo, z_hi = (math.log(z) for z in cfg.zoom_range)
    if kind == "anatomy":  # zooming in would drop labels of a space-filling map out of view
        z_hi = math.log(1.25)
    centre = _u(gen, z_lo, z_hi)
    half = spread * (z_hi - z_lo) / 2
    zoom_lo = math.exp(max(z_lo, centre - half))
    zoom_hi = math.exp(min(z_hi, centre + half))
    return _TaskV2(
        seed=seed,
        kind=kind,
        num_labels=num_labels,
        num_classes=num_classes,
        means=means_t,
        objects=tuple(objects),
        map_index=map_index,
        position_jitter=_u(gen, *cfg.position_jitter_range),
        size_jitter=_u(gen, *cfg.size_jitter_range),
        spread=spread,
        zoom_lo=zoom_lo,
        zoom_hi=zoom_hi,
        elastic=_u(gen, *cfg.elastic_range) * (1.5 if kind == "real" else 1.0),
        crop_prob=cfg.crop_prob_choices[
            int(torch.randint(len(cfg.crop_prob_choices), (), generator=gen))
        ],
        intensity_jitter=_u(gen, *cfg.intensity_jitter_range),
        texture=_u(gen, *cfg.texture_range),
        bias_strength=_u(gen, *cfg.bias_strength_range),
        blur_sigma=_u(gen, *cfg.blur_sigma_range),
        lowres=_u(gen, 0, 1) < cfg.lowres_prob,
        noise_std=_u(gen, *cfg.noise_std_range),
        rician=_u(gen, 0, 1) < cfg.rician_prob,
    )


# ----------------------------------------------------------------------------- shapes


def _object_mask(obj: _Object, px: Tensor, py: Tensor, u: Tensor) -> Tensor:
    """Membership ``(n, H, W)`` bool of ``obj`` at canonical coordinates ``px, py (n, H, W)``.

    ``u (n, _OBJ_DRAWS)`` uniforms in [-1, 1]: [0] log-size jitter, [1] angle jitter,
    [4:] component centre jitters (scaled by the caller into ``u``)."""
    scale = u[:, 0, None, None]  # multiplicative, already exp'ed
    if obj.shape == "tube":
        return _tube_mask(obj, px, py, u)
    inside = torch.zeros(px.shape, dtype=torch.bool, device=px.device)
    for c in range(obj.centres.shape[0]):
        cx = obj.centres[c, 0] + u[:, 4 + 2 * c, None, None]
        cy = obj.centres[c, 1] + u[:, 5 + 2 * c, None, None]
        angle = obj.angle + u[:, 1, None, None]
        dx, dy = px - cx, py - cy
        cos, sin = torch.cos(angle), torch.sin(angle)
        a = obj.radius * scale * math.sqrt(obj.aspect)
        b = obj.radius * scale / math.sqrt(obj.aspect)
        ex, ey = (cos * dx + sin * dy) / a, (-sin * dx + cos * dy) / b
        rho = torch.sqrt(ex * ex + ey * ey)
        phi = torch.atan2(ey, ex)
        edge = torch.ones_like(rho)
        for k in range(4):
            amp, phase = obj.wobble[k, 0].item(), obj.wobble[k, 1].item()
            if amp:
                edge = edge + amp * torch.cos((k + 2) * phi + phase)
        if obj.shape == "ring":
            inside |= (rho - edge).abs() < obj.thickness * 0.5
        else:
            inside |= rho < edge
    return inside


def _tube_mask(obj: _Object, px: Tensor, py: Tensor, u: Tensor) -> Tensor:
    """A tube of half width ``obj.width`` (times the subject's size jitter) along a cubic
    Bezier curve whose control points jitter per subject."""
    t = torch.linspace(0, 1, _CURVE_SAMPLES + 1, device=px.device)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)
    ctrl = obj.curve.to(px.device)[None] + u[:, 4 : 4 + 2 * _CURVE_POINTS].reshape(-1, 4, 2)
    pts = basis @ ctrl  # (n, M+1, 2)
    # One segment at a time, keeping the running minimum of the squared distance: the same
    # result as one (n, H*W, M) tensor, at a fraction of the memory traffic.
    d2 = torch.full_like(px, math.inf)
    for m in range(_CURVE_SAMPLES):
        ax, ay = pts[:, m, 0, None, None], pts[:, m, 1, None, None]
        abx = pts[:, m + 1, 0, None, None] - ax
        aby = pts[:, m + 1, 1, None, None] - ay
        vx, vy = px - ax, py - ay
        t_proj = ((vx * abx + vy * aby) / (abx * abx + aby * aby).clamp_min(1e-12)).clamp_(0, 1)
        dx, dy = vx - t_proj * abx, vy - t_proj * aby
        d2 = torch.minimum(d2, dx * dx + dy * dy)
    width = obj.width * u[:, 0, None, None]
    return d2 < width * width


# ----------------------------------------------------------------------------- real maps


@lru_cache(maxsize=4)
def mni152_label_maps(size: int = 128, step: int = 6) -> Tensor:
    """Real 2D label maps ``(M, size, size)`` uint8 from the MNI152 template in nilearn.

    Values: 0 outside the head, 1 grey matter, 2 white matter, 3 the rest of the head
    (CSF, skull, scalp: nilearn ships GM and WM probability maps but no CSF one), by argmax of
    the probabilities inside the head (T1 > 2% of its maximum). Slices every ``step`` voxels
    along all three axes where the brain is large (:func:`megaseg.examples.brain_extent`),
    padded square and resized (nearest). Allowed training data: the template is not one of
    the reserved held-out sources.
    """
    import nibabel as nib

    from megaseg.examples import brain_extent, mni152_files

    files = mni152_files()
    t1 = nib.load(str(files["t1"])).get_fdata(dtype=np.float32)
    probs = []
    for key in ("gm", "wm"):
        p = nib.load(str(files[key])).get_fdata(dtype=np.float32)
        probs.append(p / 255.0 if p.max() > 1.0 else p)
    gm, wm = probs
    other = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = (np.stack([gm, wm, other]).argmax(0) + 1).astype(np.uint8)
    labels[t1 <= 0.02 * t1.max()] = 0
    brain = np.where((labels == 1) | (labels == 2), 1, 0).astype(np.uint8)
    out = []
    for axis in range(3):
        lo, hi = brain_extent(brain, axis, min_fraction=0.3)
        for i in range(lo, hi, step):
            out.append(square_label_slice(np.take(labels, i, axis=axis), size))
    return torch.stack(out)


def square_label_slice(label: np.ndarray, size: int) -> Tensor:
    """A label slice ``(h, w)`` (values 0-255) centred in a square (zero padding) and resized
    to ``(size, size)`` uint8 by nearest neighbour, so that values stay labels."""
    from megaseg.preprocess import pad_to_square

    square, _ = pad_to_square(torch.from_numpy(np.ascontiguousarray(label)).float())
    return F.interpolate(square[None, None], size=(size, size), mode="nearest")[0, 0].byte()


def _maps_key(maps: Tensor | None) -> str:
    if maps is None:
        return "none"
    digest = hashlib.sha256(maps.contiguous().numpy().tobytes()).hexdigest()[:16]
    return f"{tuple(maps.shape)}:{digest}"


# ----------------------------------------------------------------------------- generator


class SyntheticTasksV2(TaskRange):
    """``num_tasks`` v2 tasks of ``config.num_subjects`` subjects (same API as v1's
    :class:`~megaseg.data.synthetic.SyntheticTasks`).

    Args:
        num_tasks, seed_offset: global task ids ``[seed_offset, seed_offset + num_tasks)``;
            ``seed_offset=HELDOUT_SEED_OFFSET`` for held-out evaluation.
        config: the task distribution.
        label_maps: real label maps ``(M, H, W)`` integer (0 = background) for the ``real``
            kind, e.g. :func:`mni152_label_maps`; resized (nearest) to ``config.size``, and
            each map's nonzero values renumbered ``1..L`` in order (every label is a task).
            None: no ``real`` tasks (their share goes to the other kinds).
    """

    version = GENERATOR_VERSION
    label_offset = 1  # map value 0 is the background, never a task

    def __init__(
        self,
        num_tasks: int = 1000,
        seed_offset: int = 0,
        config: SyntheticV2Config = SyntheticV2Config(),  # noqa: B008 (frozen)
        label_maps: Tensor | np.ndarray | None = None,
    ):
        self._set_range(num_tasks, seed_offset)
        if label_maps is not None:
            maps = torch.as_tensor(np.asarray(label_maps))
            if maps.ndim != 3 or maps.shape[0] < 1 or maps.is_floating_point():
                raise ValueError(
                    f"label_maps must be integer (M, H, W) with M >= 1, got {tuple(maps.shape)} "
                    f"{maps.dtype}"
                )
            if int(maps.min()) < 0 or int(maps.max()) >= _MAX_CLASSES:
                raise ValueError(f"label_maps values must be in [0, {_MAX_CLASSES})")
            if maps.shape[1:] != (config.size, config.size):
                maps = F.interpolate(
                    maps[:, None].float(), size=(config.size, config.size), mode="nearest"
                )[:, 0]
            maps = maps.long()
            # Each map's labels renumbered 1..L_m in order, so every label index is a task.
            counts = []
            for i, m in enumerate(maps):
                values = torch.unique(m[m > 0])
                if len(values) == 0:
                    raise ValueError(f"label_maps[{i}]: no nonzero label (at {config.size} px)")
                lut = torch.zeros(int(m.max()) + 1, dtype=torch.long)
                lut[values] = torch.arange(1, len(values) + 1)
                maps[i] = lut[m]
                counts.append(len(values))
            label_maps = maps.to(torch.uint8).contiguous()
            self._num_map_labels = counts
        self.config = config
        self.label_maps = label_maps
        self._maps_key = _maps_key(label_maps)

    def __repr__(self) -> str:
        maps = "none" if self.label_maps is None else self._maps_key
        return (
            f"SyntheticTasksV2(num_tasks={self.num_tasks}, seed_offset={self.seed_offset}, "
            f"size={self.config.size}, num_subjects={self.config.num_subjects}, "
            f"label_maps={maps})"
        )

    def fingerprint(self) -> str:
        """What the tasks depend on besides the task id: version, config and label maps."""
        return f"v{GENERATOR_VERSION}:{self.config!r}:maps={self._maps_key}"

    def _params(self, task: int) -> _TaskV2:
        num_maps = 0 if self.label_maps is None else self.label_maps.shape[0]
        return _task(self.task_seed(task), self.config, self._maps_key, num_maps)

    # -- public API ------------------------------------------------------------------------

    def kind(self, task: int) -> str:
        """``"objects"``, ``"anatomy"`` or ``"real"``."""
        return self._params(task).kind

    def num_labels(self, task: int) -> int:
        p = self._params(task)
        if p.kind == "real":
            return self._num_map_labels[p.map_index]
        return p.num_labels

    def subjects(self, task: int, indices: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
        """Images ``(n, 1, H, W)`` float32 in [0, 1] and label maps ``(n, H, W)`` int64."""
        p = self._params(task)
        cfg = self.config
        size, n = cfg.size, len(indices)
        if n == 0:
            raise ValueError("indices is empty")
        device = torch.device("cpu") if device is None else torch.device(device)

        # Per-subject draws in a fixed order and of fixed sizes, whatever the kind.
        eg, tg, bg = cfg.elastic_grid, cfg.texture_grid, cfg.bias_grid
        splits = (2 * eg * eg, _MAX_CLASSES, tg * tg, bg * bg)
        uni = torch.empty(n, _NUM_UNIFORMS)
        obj_u = torch.empty(n, _MAX_OBJECTS, _OBJ_DRAWS)
        normal = torch.empty(n, sum(splits))
        noise = torch.empty(n, 2, size, size)
        for row, index in enumerate(indices):
            self._check_index(index)
            gen = torch.Generator().manual_seed(hash_seed(p.seed, int(index)))
            torch.rand(_NUM_UNIFORMS, generator=gen, out=uni[row])
            torch.rand(_MAX_OBJECTS, _OBJ_DRAWS, generator=gen, out=obj_u[row])
            torch.randn(sum(splits), generator=gen, out=normal[row])
            torch.randn(2, size, size, generator=gen, out=noise[row])
        elastic, jitter, texture, bias = normal.to(device).split(splits, dim=1)
        uni, obj_u = uni.to(device), 2 * obj_u.to(device) - 1

        px, py = self._coordinates(p, uni, elastic)
        classes = self._classes(p, px, py, obj_u, device)
        num_classes = int(classes.max()) + 1 if p.kind == "real" else p.num_classes
        labels = torch.where(classes <= self.num_labels(task), classes, 0)

        # Appearance: class means with per-subject jitter, texture, bias, blur, low resolution,
        # noise, min-max; then the field-of-view crop.
        means = (
            p.means[: max(num_classes, 1)].to(device)[None]
            + p.intensity_jitter * jitter[:, : max(num_classes, 1)]
        )
        image = torch.gather(means, 1, classes.flatten(1)).view(n, 1, size, size)
        image = image + p.texture * smooth_field(texture.view(n, 1, tg, tg), size)
        image = image * torch.exp(p.bias_strength * smooth_field(bias.view(n, 1, bg, bg), size))
        image = self._degrade(p, image, uni)
        noise = noise.to(device) * p.noise_std * (0.7 + 0.6 * uni[:, 9, None, None, None])
        if p.rician:
            image = torch.sqrt((image + noise[:, :1]) ** 2 + noise[:, 1:] ** 2)
        else:
            image = image + noise[:, :1]
        lo = image.amin(dim=(2, 3), keepdim=True)
        hi = image.amax(dim=(2, 3), keepdim=True)
        image = ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp_(0.0, 1.0)
        keep = self._fov(p, uni, size, device)
        return image * keep[:, None], labels * keep.long()

    # -- pieces ----------------------------------------------------------------------------

    def _coordinates(self, p: _TaskV2, uni: Tensor, elastic: Tensor) -> tuple[Tensor, Tensor]:
        """Canonical coordinates ``(n, H, W)`` seen by each subject's pixels: zoom, rotation,
        shift (per subject, within the task's spread) and a smooth elastic displacement."""
        cfg, size, n = self.config, self.config.size, uni.shape[0]
        device = uni.device
        zoom = torch.exp(
            math.log(p.zoom_lo) + (math.log(p.zoom_hi) - math.log(p.zoom_lo)) * uni[:, 0]
        )
        aspect = torch.exp(cfg.aspect_jitter * (2 * uni[:, 1] - 1))
        angle = math.radians(cfg.rotation_deg) * p.spread * (2 * uni[:, 2] - 1)
        shift = cfg.shift * p.spread * (2 * uni[:, 3:5] - 1)
        if p.kind == "objects" and p.objects:
            # Zoomed-in views centre towards the first structure, as a scan centres on its
            # target, so it stays (mostly) in view.
            pull = (1 - 1 / zoom).clamp_min(0)[:, None] * (0.5 + 0.5 * uni[:, 5:6])
            shift = shift / zoom[:, None] + pull * p.objects[0].centres[0].to(device)
        coords = (2 * torch.arange(size, device=device) + 1) / size - 1
        x, y = coords[None, None, :], coords[None, :, None]
        sx = (1 / (zoom * aspect))[:, None, None]
        sy = (aspect / zoom)[:, None, None]
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        eg = cfg.elastic_grid
        disp = 2 * p.elastic * smooth_field(elastic.view(n, 2, eg, eg), size)
        px = cos * sx * x - sin * sy * y + shift[:, 0, None, None] + disp[:, 0]
        py = sin * sx * x + cos * sy * y + shift[:, 1, None, None] + disp[:, 1]
        return px, py

    def _classes(self, p: _TaskV2, px: Tensor, py: Tensor, obj_u: Tensor, device) -> Tensor:
        """Class map ``(n, H, W)`` int64: 0 background, then labels, then distractors."""
        n, size = px.shape[0], px.shape[-1]
        if p.kind == "objects":
            classes = torch.zeros(n, size, size, dtype=torch.int64, device=device)
            # Distractors first, labelled structures on top (a target is never hidden).
            for j in reversed(range(len(p.objects))):
                obj = p.objects[j]
                u = obj_u[:, j].clone()
                u[:, 0] = torch.exp(p.size_jitter * u[:, 0] * 1.7)
                u[:, 1] = 0.3 * p.spread * u[:, 1]
                # Tubes jitter their control points, less than whole objects move.
                u[:, 4:] = p.position_jitter * u[:, 4:] * (0.15 if obj.shape == "tube" else 1.0)
                classes[_object_mask(obj, px, py, u)] = obj.label
            return classes
        if p.kind == "anatomy":
            v1 = SyntheticConfig(min_labels=2, max_labels=10)
            base = task_anatomy(p.seed, v1).logits(_CANONICAL).argmax(0) + 1
            base = base.float()
        else:
            base = self.label_maps[p.map_index].float()
        grid = torch.stack([px, py], dim=-1)
        out = F.grid_sample(
            base.to(device).expand(n, 1, -1, -1),
            grid,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )
        return out[:, 0].round().long()

    def _degrade(self, p: _TaskV2, image: Tensor, uni: Tensor) -> Tensor:
        """Anisotropic blur (per-subject sigma per axis) and resolution loss."""
        size = image.shape[-1]
        out = []
        for i in range(image.shape[0]):
            x = image[i : i + 1]
            sx = round(p.blur_sigma * (0.2 + 0.8 * uni[i, 6].item()) * size / 128, 2)
            sy = round(p.blur_sigma * (0.2 + 0.8 * uni[i, 7].item()) * size / 128, 2)
            x = _blur_axes(x, sy, sx)
            if p.lowres:
                f = 1 + (self.config.lowres_max_factor - 1) * uni[i, 8].item()
                both = uni[i, 10].item() < 0.5
                along_x = uni[i, 11].item() < 0.5
                h = size if (not both and along_x) else max(4, round(size / f))
                w = size if (not both and not along_x) else max(4, round(size / f))
                if (h, w) != (size, size):
                    x = F.interpolate(x, size=(h, w), mode="area")
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out.append(x)
        return torch.cat(out)

    def _fov(self, p: _TaskV2, uni: Tensor, size: int, device) -> Tensor:
        """``(n, H, W)`` float 1 inside each subject's field of view, 0 outside."""
        n = uni.shape[0]
        keep = torch.ones(n, size, size, device=device)
        cropped = uni[:, 12] < p.crop_prob
        if not cropped.any():
            return keep
        k = self.config.crop_min_keep
        idx = torch.arange(size, device=device)
        for i in torch.nonzero(cropped).flatten().tolist():
            # One or two sides cut: a rectangle keeping >= k of each side.
            w = round(size * (k + (1 - k) * uni[i, 13].item()))
            h = round(size * (k + (1 - k) * uni[i, 14].item()))
            x0 = round((size - w) * uni[i, 15].item())
            y0 = round((size - h) * uni[i, 5].item())
            inside = ((idx >= y0) & (idx < y0 + h))[:, None] & ((idx >= x0) & (idx < x0 + w))[None]
            keep[i] = inside.float()
        return keep


_CANONICAL = 128  # anatomy kind: base map size in the canonical frame (output-size free)


def _blur_axes(x: Tensor, sigma_y: float, sigma_x: float) -> Tensor:
    """Gaussian blur of ``x (1, 1, H, W)`` with its own sigma per axis (pixels)."""

    size = x.shape[-1]
    if sigma_y >= 0.1:
        x = blur_matrix(size, sigma_y).to(x.device) @ x
    if sigma_x >= 0.1:
        x = x @ blur_matrix(size, sigma_x).to(x.device).T
    return x


def preview_png(
    path: str | Path,
    synthetic: SyntheticTasksV2,
    tasks: Sequence[int] = tuple(range(6)),
    subjects: int = 5,
) -> Path:
    """A grid: one row per task, ``subjects`` images side by side with the first label's
    outline, then their label maps. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2 * subjects * 1.3, len(tasks) * 1.35), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), 2 * subjects, squeeze=False)
    for r, t in enumerate(tasks):
        images, labels = synthetic.subjects(t, list(range(subjects)))
        for s in range(subjects):
            axes[r, s].imshow(images[s, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, s].contour((labels[s] == 1).numpy(), levels=[0.5], colors="r", linewidths=0.6)
            axes[r, subjects + s].imshow(
                labels[s].numpy(), cmap="tab10", interpolation="nearest", vmin=0, vmax=9
            )
        axes[r, 0].set_ylabel(
            f"task {t}\n{synthetic.kind(t)} L={synthetic.num_labels(t)}", fontsize=7
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    path = Path(path)
    atomic_write(path, fig.savefig, suffix=".png")
    return path
