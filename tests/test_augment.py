"""Episode augmentation: task-level vs in-task draws, ranges, determinism, each transform."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaseg.data.augment import (
    IN_TASK_AUGMENTATIONS,
    TASK_AUGMENTATIONS,
    Affine,
    AugmentConfig,
    Elastic,
    EpisodeAugment,
    Flip,
    GaussianNoise,
    GeometricTransform,
    InvertLabel,
    SobelEdge,
)
from megaseg.data.augment.geometric import identity_points

B, N, H = 2, 4, 32


def always(config: AugmentConfig) -> AugmentConfig:
    """Every transform of ``config`` with p=1."""
    return AugmentConfig(tuple(dataclasses.replace(t, p=1.0) for t in config.transforms))


def only(config: AugmentConfig, *kinds: type) -> AugmentConfig:
    return AugmentConfig(tuple(t for t in config.transforms if isinstance(t, kinds)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def episodes():
    """``(B, N, 1, H, W)`` smooth images in [0, 1] and soft disc labels (different per slot)."""
    g = gen(1)
    coarse = torch.rand(B * N, 1, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(H, H), mode="bilinear")
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    centre = 8 + 16 * torch.rand(B * N, 2, generator=g)
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    labels = (6 - dist).clamp(0, 1)[:, None]
    return images.view(B, N, 1, H, H), labels.view(B, N, 1, H, H)


@pytest.fixture
def same_example(episodes):
    """Episodes whose N slots hold the same example."""
    images, labels = episodes
    return images[:, :1].expand(-1, N, -1, -1, -1).clone(), labels[:, :1].expand(
        -1, N, -1, -1, -1
    ).clone()


# --- the pipeline ---------------------------------------------------------------------------


def test_shapes_dtype_device_preserved(episodes):
    images, labels = episodes
    out_images, out_labels = EpisodeAugment()(images, labels, gen())
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    assert out_images.dtype == images.dtype and out_images.device == images.device
    assert out_images.is_contiguous() and out_labels.is_contiguous()


def test_low_precision_inputs_and_autocast(episodes):
    """Computed in float32 whatever the input dtype or an enclosing autocast; dtype kept."""
    images, labels = (t.to(torch.bfloat16) for t in episodes)
    aug = EpisodeAugment(always(TASK_AUGMENTATIONS), always(IN_TASK_AUGMENTATIONS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_images, out_labels = aug(images, labels, gen())
    reference = aug(*episodes, gen())
    assert out_images.dtype == out_labels.dtype == torch.bfloat16
    torch.testing.assert_close(out_images.float(), reference[0], atol=0.02, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_outputs_stay_in_unit_range(episodes, seed):
    aug = EpisodeAugment(always(TASK_AUGMENTATIONS), always(IN_TASK_AUGMENTATIONS))
    images, labels = aug(*episodes, gen(seed))
    assert images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() <= 1


def test_same_seed_same_output_other_seed_differs(episodes):
    aug = EpisodeAugment()
    first = aug(*episodes, gen(7))
    again = aug(*episodes, gen(7))
    other = aug(*episodes, gen(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_probability_zero_is_identity(episodes):
    images, labels = episodes
    never = [
        AugmentConfig(tuple(dataclasses.replace(t, p=0.0) for t in c.transforms))
        for c in (TASK_AUGMENTATIONS, IN_TASK_AUGMENTATIONS)
    ]
    for aug in (
        EpisodeAugment(*never),
        EpisodeAugment(task=None, in_task=None),
        EpisodeAugment(AugmentConfig(TASK_AUGMENTATIONS.transforms, enabled=False), None),
    ):
        out_images, out_labels = aug(images, labels, gen())
        assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def test_inputs_are_not_modified(episodes):
    images, labels = episodes
    before = images.clone(), labels.clone()
    EpisodeAugment(always(TASK_AUGMENTATIONS), always(IN_TASK_AUGMENTATIONS))(images, labels, gen())
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1])


@pytest.mark.parametrize("seed", range(3))
def test_task_level_is_one_function_for_the_whole_episode(same_example, seed):
    """Identical examples stay identical under task-level augmentation (geometry included)."""
    aug = EpisodeAugment(task=always(TASK_AUGMENTATIONS), in_task=None)
    images, labels = aug(*same_example, gen(seed))
    assert not torch.equal(images, same_example[0])
    for i in range(1, N):
        torch.testing.assert_close(images[:, i], images[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(labels[:, i], labels[:, 0], atol=1e-6, rtol=0)
    # ... but the episodes of a batch get different draws.
    assert not torch.allclose(images[0], images[1])


def test_in_task_draws_differ_across_examples(same_example):
    aug = EpisodeAugment(task=None, in_task=always(only(IN_TASK_AUGMENTATIONS, Affine)))
    images, labels = aug(*same_example, gen())
    for i in range(1, N):
        assert not torch.allclose(images[:, i], images[:, 0])
        assert not torch.allclose(labels[:, i], labels[:, 0])


def test_geometry_is_the_same_for_image_and_label(episodes):
    """With the label equal to the image, any mix of geometric transforms keeps them equal."""
    images, _ = episodes
    geometric = (Affine, Elastic, Flip)
    aug = EpisodeAugment(
        always(only(TASK_AUGMENTATIONS, *geometric)),
        always(only(IN_TASK_AUGMENTATIONS, *geometric)),
    )
    out_images, out_labels = aug(images, images.clone(), gen())
    assert not torch.equal(out_images, images)
    torch.testing.assert_close(out_images, out_labels, atol=0, rtol=0)


def test_intensity_transforms_leave_labels_and_label_transforms_leave_images(episodes):
    images, labels = episodes
    intensity = [t for t in TASK_AUGMENTATIONS.transforms if t.kind == "intensity"]
    label_only = [t for t in TASK_AUGMENTATIONS.transforms if t.kind == "label"]
    out_images, out_labels = EpisodeAugment(always(AugmentConfig(tuple(intensity))), None)(
        images, labels, gen()
    )
    assert torch.equal(out_labels, labels) and not torch.equal(out_images, images)
    for t in label_only:
        out_images, out_labels = EpisodeAugment(
            AugmentConfig((dataclasses.replace(t, p=1.0),)), None
        )(images, labels, gen())
        assert torch.equal(out_images, images) and not torch.equal(out_labels, labels)


def test_sampling_is_separate_from_applying(episodes):
    aug = EpisodeAugment()
    params = aug.sample(B, N, gen(3))
    first = aug.apply(*episodes, params)
    second = aug.apply(*episodes, params)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # __call__ is exactly sample then apply with the same generator state.
    called = aug(*episodes, gen(3))
    assert torch.equal(first[0], called[0]) and torch.equal(first[1], called[1])


def test_task_draws_have_one_row_per_episode_in_task_one_per_example():
    params = EpisodeAugment().sample(B, N, gen())
    for draw in params.draws:
        assert draw.active.shape == ((B,) if draw.task_level else (B * N,))
        for value in draw.params.values():
            assert value.shape[0] == draw.active.shape[0]
    names = [type(d.transform).__name__ for d in params.draws if d.task_level]
    assert names == [type(t).__name__ for t in TASK_AUGMENTATIONS.transforms]


def test_task_level_noise_has_one_sigma_per_episode(same_example):
    noise = AugmentConfig((GaussianNoise(p=1.0, sigma=(0.01, 0.1)),))
    images, _ = same_example
    flat = torch.full_like(images, 0.5)
    out, _ = EpisodeAugment(noise, None)(flat, flat.clone(), gen())
    std = (out - 0.5).std(dim=(2, 3, 4))  # (B, N)
    torch.testing.assert_close(std, std[:, :1].expand(-1, N))
    assert not torch.allclose(std[0], std[1])


def test_apply_checks_shapes(episodes):
    images, labels = episodes
    aug = EpisodeAugment()
    with pytest.raises(ValueError):
        aug(images[:, :, 0], labels[:, :, 0], gen())
    with pytest.raises(ValueError):
        aug.apply(images, labels, aug.sample(B, N + 1, gen()))


def test_config_replace():
    config = TASK_AUGMENTATIONS.replace(SobelEdge, p=0.0)
    assert [t.p for t in config.transforms if isinstance(t, SobelEdge)] == [0.0]
    assert TASK_AUGMENTATIONS.transforms[-1].p == 0.5  # the reference list is unchanged
    with pytest.raises(KeyError):
        IN_TASK_AUGMENTATIONS.replace(SobelEdge, p=0.0)


# --- single transforms ----------------------------------------------------------------------


def test_label_inversion(episodes):
    _, labels = episodes
    x = labels.flatten(0, 1)
    _, out = InvertLabel(p=1.0)(x, x, gen())
    torch.testing.assert_close(out, 1 - x)


def test_sobel_edge_of_a_square():
    label = torch.zeros(1, 1, 32, 32)
    label[..., 8:24, 8:24] = 1.0
    image = torch.rand(1, 1, 32, 32)
    out_image, edge = SobelEdge(p=1.0)(image, label, gen())
    assert torch.equal(out_image, image)
    assert edge.max() == 1.0 and edge.min() >= 0
    assert edge[..., 12:20, 12:20].abs().max() == 0  # inside
    assert edge[..., :5, :].abs().max() == 0 and edge[..., 28:, :].abs().max() == 0  # outside
    assert (edge[..., 16, 7:9] > 0.5).all() and (edge[..., 16, 23:25] > 0.5).all()  # the border
    # Soft labels give a normalized edge too; an empty label gives no edge.
    _, soft_edge = SobelEdge(p=1.0)(image, 0.3 * label, gen())
    torch.testing.assert_close(soft_edge, edge)
    _, empty = SobelEdge(p=1.0)(image, torch.zeros_like(label), gen())
    assert torch.equal(empty, torch.zeros_like(label))


def test_flip_matches_torch_flip(episodes):
    images, labels = episodes
    x = images.flatten(0, 1)
    flip = Flip(p=1.0)
    for vertical, dim in ((False, -1), (True, -2)):
        params = {"vertical": torch.full((len(x),), vertical)}
        out, _ = flip.apply(x, x, params)
        torch.testing.assert_close(out, x.flip(dim), atol=1e-5, rtol=0)


def test_affine_quarter_turn_matches_rot90(episodes):
    images, _ = episodes
    x = images.flatten(0, 1)
    n = len(x)
    params = {
        "angle": torch.full((n,), torch.pi / 2),
        "scale": torch.ones(n),
        "shift": torch.zeros(n, 2),
    }
    out, _ = Affine(p=1.0).apply(x, x, params)
    matches = [torch.allclose(out, x.rot90(k, dims=(-2, -1)), atol=1e-5) for k in (1, 3)]
    assert any(matches)


@pytest.mark.parametrize("transform", [Affine(p=1.0), Flip(p=1.0), Elastic(p=1.0)])
def test_point_maps_agree_on_the_identity_shortcut(transform: GeometricTransform):
    """map_points(None) (the pixel-grid shortcut) equals map_points(pixel centres)."""
    size = (24, 40)  # non-square on purpose
    params = transform.sample(3, gen())
    fast = transform.map_points(None, params, size)
    general = transform.map_points(identity_points(3, size, torch.empty(0)), params, size)
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_matches_cpu(episodes):
    images, labels = episodes
    # Noise fields are generated on the images' device, so CPU and GPU differ there by design.
    noiseless = [
        AugmentConfig(tuple(t for t in always(c).transforms if not isinstance(t, GaussianNoise)))
        for c in (TASK_AUGMENTATIONS, IN_TASK_AUGMENTATIONS)
    ]
    aug = EpisodeAugment(*noiseless)
    cpu = aug(images, labels, gen())
    gpu = aug(images.cuda(), labels.cuda(), gen())
    assert gpu[0].device.type == "cuda"
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-4, rtol=0)


def test_show_episodes_writes_a_png(tmp_path):
    from megaseg.cli.show_episodes import main

    out = tmp_path / "episodes.png"
    assert main(["--out", str(out), "--episodes", "2", "--support", "2", "--size", "32"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the "light" preset ---------------------------------------------------------------------


def test_light_preset_is_task_level_flips_and_inversion_only():
    from megaseg.data.augment import LIGHT_TASK_AUGMENTATIONS, InvertIntensity
    from megaseg.training.datamodule import make_augment

    aug = make_augment("light")
    assert not aug.in_task.enabled and aug.task == LIGHT_TASK_AUGMENTATIONS
    assert [type(t) for t in LIGHT_TASK_AUGMENTATIONS.transforms] == [Flip, InvertIntensity]
    params = aug.sample(B, N, gen())
    assert all(d.task_level for d in params.draws)  # nothing drawn per example
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augment("lite")


def test_light_preset_only_flips_labels_and_inverts_images(episodes):
    """Each episode comes out as itself, flipped left-right or top-bottom, its images maybe
    inverted: one function for the whole episode, labels never changed but by the flip."""
    from megaseg.training.datamodule import make_augment

    images, labels = episodes
    aug = make_augment("light")
    flips = {"none": lambda x: x, "lr": lambda x: x.flip(-1), "tb": lambda x: x.flip(-2)}
    seen = set()
    for seed in range(12):
        out_images, out_labels = aug(images, labels, gen(seed))
        for b in range(B):
            (flip,) = [n for n, f in flips.items()
                       if torch.allclose(out_labels[b], f(labels[b]), atol=1e-5)]  # fmt: skip
            flipped = flips[flip](images[b])
            inverted = not torch.allclose(out_images[b], flipped, atol=1e-5)
            expected = 1 - flipped if inverted else flipped
            torch.testing.assert_close(out_images[b], expected, atol=1e-5, rtol=0)
            seen.add((flip, inverted))
    assert {f for f, _ in seen} == set(flips) and {i for _, i in seen} == {False, True}


def test_light_preset_treats_every_example_of_an_episode_alike(same_example):
    from megaseg.training.datamodule import make_augment

    for seed in range(4):
        images, labels = make_augment("light")(*same_example, gen(seed))
        for i in range(1, N):
            torch.testing.assert_close(images[:, i], images[:, 0], atol=1e-6, rtol=0)
            torch.testing.assert_close(labels[:, i], labels[:, 0], atol=1e-6, rtol=0)
