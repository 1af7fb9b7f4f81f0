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


def test_prompts_that_leave_the_place_open():
    """ "a red seven": any quadrant will do, but never one of a held-out combination; the share of
    such prompts is `open_place`; the held-out set always names the place."""
    import numpy as np

    from ladd_ds.demo.digits import HELD_OUT_COMBINATIONS, open_places, random_label

    label = DigitLabel(7, "red", None)
    assert label.prompt == "a red seven" and parse_prompt(label.prompt) == label
    rng = np.random.default_rng(0)
    labels = [random_label(rng, combinations="seen", open_place=0.5) for _ in range(2000)]
    share = sum(lb.place is None for lb in labels) / len(labels)
    assert 0.45 < share < 0.55, share
    assert all(random_label(rng, combinations="held_out", open_place=1.0).place for _ in range(50))
    places = []
    for image, lb, (h, w) in make_samples(200, "train", seed=2, combinations="seen", open_place=1.0):
        assert lb.place is None
        ys, xs = torch.nonzero(image.sum(0) > 0.05, as_tuple=True)
        top, left = ys.float().mean() < h / 2, xs.float().mean() < w / 2
        place = f"{'top' if top else 'bottom'} {'left' if left else 'right'}"
        assert place in open_places(lb) and DigitLabel(lb.digit, lb.color, place) not in HELD_OUT_COMBINATIONS
        places.append(place)
    assert len(set(places)) == 4  # every quadrant occurs


def test_accuracy_counts_any_place_right_for_an_open_prompt():
    from ladd_ds.demo.classifier import DigitClassifier, accuracy, predict
    from ladd_ds.demo.digits import COLORS, PLACES

    torch.manual_seed(0)
    model, images = DigitClassifier(), torch.rand(6, 3, 16, 16)
    pred = predict(model, images)  # whatever an untrained model reads is "right" below
    colors, places = list(COLORS), PLACES
    right = [DigitLabel(int(d), colors[c], places[p]) for d, c, p in zip(pred["digit"], pred["color"], pred["place"])]
    wrong_place = [DigitLabel(lb.digit, lb.color, places[(places.index(lb.place) + 1) % 4]) for lb in right]
    open_place = [DigitLabel(lb.digit, lb.color, None) for lb in right]
    assert accuracy(model, images, right)["all"] == 1.0
    assert accuracy(model, images, wrong_place)["all"] == 0.0 and accuracy(model, images, wrong_place)["place"] == 0.0
    acc = accuracy(model, images, open_place)
    assert acc["all"] == 1.0 and acc["place"] == 1.0
    mixed = accuracy(model, images, wrong_place[:3] + open_place[3:])
    assert mixed["all"] == 0.5 and mixed["place"] == 0.0  # place accuracy: over prompts that name one


def test_scorer_is_the_classifier_probability_and_any_place_for_an_open_prompt(tmp_path):
    from ladd_ds.demo.classifier import DigitClassifier, save_classifier
    from ladd_ds.demo.scoring import digit_confidence

    torch.manual_seed(0)
    model = DigitClassifier().eval()
    save_classifier(model, {"steps": 0}, tmp_path / "clf")
    score = digit_confidence(str(tmp_path / "clf"), attributes=("digit", "place"))
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        p = {k: v.softmax(dim=1) for k, v in model.logits(images).items()}
    got = score(images, ["a red seven in the top right", "a red seven"])
    torch.testing.assert_close(got[0], p["digit"][0, 7] + p["place"][0, 1])
    torch.testing.assert_close(got[1], p["digit"][1, 7] + 1.0)  # any place is right
