"""effsk.scaling against the paper's rule and the published table in REFERENCE.md."""

import math

import pytest

from effsk.scaling import make_divisible, resolve

# REFERENCE.md, "Official variants": width, depth, res, dropout, repeats per stage.
PUBLISHED = {
    "b0": (1.0, 1.0, 224, 0.2, [1, 2, 2, 3, 3, 4, 1]),
    "b1": (1.0, 1.1, 240, 0.2, [2, 3, 3, 4, 4, 5, 2]),
    "b2": (1.1, 1.2, 260, 0.3, [2, 3, 3, 4, 4, 5, 2]),
    "b3": (1.2, 1.4, 300, 0.3, [2, 3, 3, 5, 5, 6, 2]),
    "b4": (1.4, 1.8, 380, 0.4, [2, 4, 4, 6, 6, 8, 2]),
    "b5": (1.6, 2.2, 456, 0.4, [3, 5, 5, 7, 7, 9, 3]),
    "b6": (1.8, 2.6, 528, 0.5, [3, 6, 6, 8, 8, 11, 3]),
    "b7": (2.0, 3.1, 600, 0.5, [4, 7, 7, 10, 10, 13, 4]),
}
STAGE_CHANNELS = {
    "b0": [16, 24, 40, 80, 112, 192, 320],
    "b1": [16, 24, 40, 80, 112, 192, 320],
    "b2": [16, 24, 48, 88, 120, 208, 352],
    "b3": [24, 32, 48, 96, 136, 232, 384],
    "b4": [24, 32, 56, 112, 160, 272, 448],
    "b5": [24, 40, 64, 128, 176, 304, 512],
    "b6": [32, 40, 72, 144, 200, 344, 576],
    "b7": [32, 48, 80, 160, 224, 384, 640],
}
STEM_HEAD = {"b0": (32, 1280), "b1": (32, 1280), "b2": (32, 1408), "b3": (40, 1536),
             "b4": (48, 1792), "b5": (48, 2048), "b6": (56, 2304), "b7": (64, 2560)}
LITE = {"lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2), "lite2": (1.1, 1.2, 260, 0.3),
        "lite3": (1.2, 1.4, 280, 0.3), "lite4": (1.4, 1.8, 300, 0.3)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_variants_match_reference_table(name):
    width, depth, res, dropout, repeats = PUBLISHED[name]
    for phi in (name, name.upper(), int(name[1])):
        s = resolve(phi)
        assert (s.width, s.depth, s.resolution, s.dropout) == (width, depth, res, dropout)
        assert [st.repeats for st in s.stages] == repeats
        assert [st.out_channels for st in s.stages] == STAGE_CHANNELS[name]
        assert (s.stem_channels, s.head_channels) == STEM_HEAD[name]
        assert s.name == name and not s.lite


@pytest.mark.parametrize("name", list(LITE))
def test_lite_variants(name):
    width, depth, res, dropout = LITE[name]
    s = resolve(name)
    assert (s.width, s.depth, s.resolution, s.dropout, s.lite) == (width, depth, res, dropout, True)
    assert (s.stem_channels, s.head_channels) == (32, 1280)
    # first and last stage repeats are not scaled
    assert s.stages[0].repeats == 1 and s.stages[-1].repeats == 1


def test_rounding_rules_match_reference_formula():
    for c in (16, 24, 32, 40, 80, 112, 192, 320, 1280):
        for w in (0.25, 0.5, 1.0, 1.1, 1.2, 1.37, 1.4, 1.6, 1.8, 2.0, 4.3):
            expected = max(8, int(c * w + 4) // 8 * 8)
            if expected < 0.9 * c * w:
                expected += 8
            assert make_divisible(c * w) == expected
    s = resolve(2.5, scaling="compound")
    assert [st.repeats for st in s.stages] == [math.ceil(r * 1.2**2.5) for r in (1, 2, 2, 3, 3, 4, 1)]


@pytest.mark.parametrize("phi", [0, 0.5, 1, 2.5, 3.7, 7, 9])
def test_compound_rule_is_exact(phi):
    s = resolve(phi, scaling="compound")
    assert s.width == pytest.approx(1.1**phi) and s.depth == pytest.approx(1.2**phi)
    assert s.resolution == round(224 * 1.15**phi)
    s2 = resolve(phi, scaling="compound", alpha=1.4, beta=1.2, gamma=1.05)
    assert s2.width == pytest.approx(1.2**phi) and s2.depth == pytest.approx(1.4**phi)
    assert s2.resolution == round(224 * 1.05**phi)


def test_fractional_phi_interpolates_geometrically_between_neighbours():
    s = resolve(2.25)
    w2, d2, r2 = PUBLISHED["b2"][:3]
    w3, d3, r3 = PUBLISHED["b3"][:3]
    assert s.width == pytest.approx(w2**0.75 * w3**0.25)
    assert s.depth == pytest.approx(d2**0.75 * d3**0.25)
    assert s.resolution == round(r2**0.75 * r3**0.25)
    assert s.name is None and s.dropout == pytest.approx(0.3)


def test_phi_beyond_seven_extends_b7_by_compound_rule():
    s = resolve(8.5)
    assert s.width == pytest.approx(2.0 * 1.1**1.5)
    assert s.depth == pytest.approx(3.1 * 1.2**1.5)
    assert s.resolution == round(600 * 1.15**1.5)


def test_scaled_quantities_grow_monotonically_with_phi():
    phis = [i / 4 for i in range(0, 41)]
    for mode in ("official", "compound"):
        configs = [resolve(p, scaling=mode) for p in phis]
        for a, b in zip(configs, configs[1:]):
            assert b.width >= a.width and b.depth >= a.depth and b.resolution >= a.resolution


@pytest.mark.parametrize("bad", [-1, -0.1, float("nan"), float("inf"), True, False, "b9", "resnet", None, [1]])
def test_bad_phi_raises_value_error_listing_accepted(bad):
    with pytest.raises(ValueError, match="published name"):
        resolve(bad)


def test_bad_scaling_and_bases():
    with pytest.raises(ValueError, match="official"):
        resolve(1, scaling="linear")
    with pytest.raises(ValueError, match="alpha"):
        resolve(1, scaling="compound", alpha=0.9)


def test_scaling_round_trips_through_dict():
    s = resolve(1.3)
    assert type(s).from_dict(s.as_dict()) == s
