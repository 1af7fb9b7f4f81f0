"""The demo data set: colored, placed digits with prompts, and the invertible latent map."""

import torch

from ladd_ds.demo.digits import (
    BUCKETS,
    LATENT_CHANNELS,
    DigitLabel,
    from_latent,
    load_source_digits,
    make_samples,
    parse_prompt,
    to_latent,
)


def test_latent_map_is_invertible_and_has_twelve_channels():
    image = torch.rand(2, 3, 16, 24)
    latent = to_latent(image)
    assert latent.shape == (2, LATENT_CHANNELS, 8, 12)
    assert latent.min() >= -1 and latent.max() <= 1
    torch.testing.assert_close(from_latent(latent), image)


def test_prompts_round_trip():
    label = DigitLabel(7, "red", "top left")
    assert label.prompt == "a red seven in the top left"
    assert parse_prompt(label.prompt) == label


def test_digits_are_drawn_in_their_color_and_place():
    samples = make_samples(40, "train", seed=0)
    assert {b for _, _, b in samples} == set(BUCKETS)  # both aspect ratios occur
    for image, label, (h, w) in samples:
        assert image.shape == (3, h, w)
        mass = image.sum(0)  # (H, W)
        ys, xs = torch.nonzero(mass > 0.05, as_tuple=True)
        cy, cx = ys.float().mean().item(), xs.float().mean().item()
        assert (cy < h / 2) == label.place.startswith("top"), label
        assert (cx < w / 2) == label.place.endswith("left"), label
        channel_totals = image.sum((1, 2))
        if label.color == "red":
            assert channel_totals.argmax() == 0
        if label.color == "blue":
            assert channel_totals.argmax() == 2


def test_splits_are_disjoint_and_sampling_is_reproducible():
    train, _ = load_source_digits("train")
    held, _ = load_source_digits("heldout")
    assert len(train) + len(held) == 1797
    a = make_samples(5, "heldout", seed=3)
    b = make_samples(5, "heldout", seed=3)
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def test_held_out_combinations_are_excluded_from_the_seen_set():
    import numpy as np

    from ladd_ds.demo.digits import COLORS, HELD_OUT_COMBINATIONS, PLACES, random_label

    assert len(HELD_OUT_COMBINATIONS) == 20
    # Each digit, color and place occurs in held-out combinations, and still in seen ones.
    assert {lb.digit for lb in HELD_OUT_COMBINATIONS} == set(range(10))
    assert {lb.color for lb in HELD_OUT_COMBINATIONS} == set(COLORS)
    assert {lb.place for lb in HELD_OUT_COMBINATIONS} == set(PLACES)
    rng = np.random.default_rng(0)
    seen = [random_label(rng, combinations="seen") for _ in range(2000)]
    held = [random_label(rng, combinations="held_out") for _ in range(200)]
    assert not any(lb in HELD_OUT_COMBINATIONS for lb in seen)
    assert len({(lb.digit, lb.color, lb.place) for lb in seen}) == 160 - 20  # every other combination occurs
    assert set(held) == HELD_OUT_COMBINATIONS
    assert all(random_label(rng, digit=3, combinations="held_out").digit == 3 for _ in range(20))
    samples = make_samples(50, "train", seed=1, combinations="seen")
    assert not any(label in HELD_OUT_COMBINATIONS for _, label, _ in samples)
