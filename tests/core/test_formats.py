"""FixedPoint: validation, parsing, serialisation, ranges and codes (oracle: Python ints)."""
import math
import warnings

import pytest
import torch

from fxcompile import FixedPoint, FormatError, as_format, fixed


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=0, frac=0), "bits"),
    (dict(bits=-3, frac=0), "bits"),
    (dict(bits=33, frac=8), "bits"),
    (dict(bits=1, frac=0, signed=True), "bits"),
    (dict(bits=8, frac=65), "frac"),
    (dict(bits=8, frac=-65), "frac"),
    (dict(bits=8, frac=4, mode="sym"), "mode"),
    (dict(bits=8, frac=4, narrow=1), "narrow"),
    (dict(bits=8, frac=4, signed=False, narrow=True), "narrow"),
    (dict(bits=8, frac=4, narrow=True, overflow="wrap"), "narrow"),
    (dict(bits=8, frac=4, rounding="up"), "rounding"),
    (dict(bits=8, frac=4, overflow="clip"), "overflow"),
    (dict(bits=8, frac=4, zero_point=128), "zero_point"),
    (dict(bits=8, frac=4, zero_point=-129), "zero_point"),
    (dict(bits=8, frac=4, signed=False, zero_point=-1), "zero_point"),
    (dict(bits=8, frac=4, signed=False, zero_point=256), "zero_point"),
    (dict(bits=8.0, frac=4), "bits"),
    (dict(bits=8, frac=4, signed=1), "signed"),
])
def test_invalid_formats_raise_format_error_naming_the_field(kwargs, field):
    with warnings.catch_warnings(), pytest.raises(FormatError, match=rf"\b{field}\b"):
        warnings.simplefilter("ignore", DeprecationWarning)
        FixedPoint(**kwargs)
    assert issubclass(FormatError, ValueError)


def test_edge_of_validity_is_accepted():
    assert FixedPoint(1, 0, signed=False).code_max == 1
    assert FixedPoint(32, 64).frac == 64 and FixedPoint(2, -64).frac == -64
    assert FixedPoint(8, 0, signed=False, zero_point=255).zero_point == 255
    assert FixedPoint(8, 0, zero_point=-128).zero_point == -128
    assert FixedPoint(8, 0, narrow=True, zero_point=-128).zero_point == -128  # range and zero point are independent


@pytest.mark.parametrize("text, expected", [
    ("16.8", FixedPoint(16, 8)),
    ("u8.8", FixedPoint(8, 8, signed=False)),
    ("16.8,stochastic,wrap", FixedPoint(16, 8, rounding="stochastic", overflow="wrap")),
    ("8.-2", FixedPoint(8, -2)),
    ("8.12,floor", FixedPoint(8, 12, rounding="floor")),
    ("u8.4,zp=100", FixedPoint(8, 4, signed=False, zero_point=100)),
    ("8.4,toward_zero,zp=-3", FixedPoint(8, 4, zero_point=-3, rounding="toward_zero")),
    ("16.8,narrow", FixedPoint(16, 8, narrow=True)),
    ("12.4,floor,narrow,zp=3", FixedPoint(12, 4, rounding="floor", narrow=True, zero_point=3)),
])
def test_parse_and_str_round_trip(text, expected):
    fmt = FixedPoint.parse(text)
    assert fmt == expected
    assert FixedPoint.parse(str(fmt)) == fmt
    assert str(fmt) == text
    assert as_format(text) == fmt


def test_fixed_is_the_string_format():
    assert fixed(16, 8) == FixedPoint.parse("16.8") == as_format((16, 8)) == as_format({"bits": 16, "frac": 8})
    assert as_format(None) is None and as_format("float") is None


@pytest.mark.parametrize("text", ["16", "16.8.1", "a.b", "16.8,round_up", "16.8,zp=x", "", "u8.4,narrow",
                                  "8.4,narrow,wrap"])
def test_parse_rejects_malformed_strings(text):
    with pytest.raises(FormatError):
        FixedPoint.parse(text)


def test_as_format_names_where():
    with pytest.raises(FormatError, match="weight"):
        as_format("40.8", where="weight")
    with pytest.raises(FormatError, match="weight"):
        as_format(3.5, where="weight")


@pytest.mark.parametrize("fmt", [fixed(16, 8), fixed(8, 4, signed=False, zero_point=7, rounding="floor"),
                                 fixed(12, -3, overflow="wrap", rounding="stochastic"), fixed(10, 3, narrow=True)])
def test_dict_round_trip(fmt):
    d = fmt.to_dict()
    assert d["bits"] == fmt.bits and d["frac"] == fmt.frac
    assert FixedPoint.from_dict(d) == fmt


def test_from_dict_errors():
    with pytest.raises(FormatError, match="colour"):
        FixedPoint.from_dict({"bits": 8, "frac": 2, "colour": "red"})
    with pytest.raises(FormatError, match="frac"):
        FixedPoint.from_dict({"bits": 8})


def _ranges(bits, signed, narrow):
    """Code range computed from the definition, independently of formats.py."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if narrow:
        lo += 1  # negation never overflows
    return lo, hi


@pytest.mark.parametrize("bits", [1, 2, 8, 16, 24, 32])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("zp", [0, 1])
@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("frac", [-3, 0, 5, 40])
def test_code_and_value_ranges(bits, signed, narrow, zp, overflow, frac):
    if (signed and bits == 1) or (narrow and (not signed or overflow == "wrap")):
        return
    fmt = FixedPoint(bits, frac, signed=signed, narrow=narrow, overflow=overflow, zero_point=zp)
    lo, hi = _ranges(bits, signed, narrow)
    assert (fmt.code_min, fmt.code_max) == (lo, hi)
    assert fmt.min_value == (lo - zp) * 2.0 ** -frac
    assert fmt.max_value == (hi - zp) * 2.0 ** -frac
    assert fmt.scale == 2.0 ** -frac
    assert fmt.spec()[:4] == [frac, lo, hi, zp]


def test_known_values():
    assert fixed(16, 8).max_value == 127.99609375 and fixed(16, 8).min_value == -128.0  # ap_fixed<16,8>
    assert FixedPoint.parse("16.8,narrow").min_value == -127.99609375 == fixed(16, 8, narrow=True).min_value
    assert FixedPoint.parse("16.8,narrow").quantize(torch.tensor([-1e6])).item() == -127.99609375
    assert fixed(16, 8).quantize(torch.tensor([-1e6])).item() == -128.0
    assert fixed(8, 8, signed=False).max_value == 255 / 256
    assert fixed(16, 8).integer_bits == 8


@pytest.mark.parametrize("fmt", [fixed(16, 8), fixed(8, 2, signed=False), fixed(8, 3, zero_point=-20),
                                 fixed(8, 3, narrow=True, zero_point=5), fixed(30, 10), fixed(6, -2), fixed(4, 9)])
def test_codes_round_trip(fmt):
    codes = torch.arange(fmt.code_min, fmt.code_max + 1, max(1, (fmt.code_max - fmt.code_min) // 997))
    values = fmt.from_codes(codes, torch.float64)
    expected = [(c - fmt.zero_point) * 2.0 ** -fmt.frac for c in codes.tolist()]
    assert values.tolist() == expected
    assert torch.equal(fmt.to_codes(values), codes)
    assert fmt.representable(values).all()
    assert not fmt.representable(values + 2.0 ** -(fmt.frac + 1)).any()


def test_to_codes_rounds_and_saturates():
    fmt = fixed(8, 1)
    x = torch.tensor([0.25, 0.75, -0.25, 1000.0, -1000.0])
    assert fmt.to_codes(x).tolist() == [0, 2, 0, 127, -128]
    assert fixed(8, 1, narrow=True).to_codes(x).tolist() == [0, 2, 0, 127, -127]
    with pytest.raises(FormatError):
        fmt.to_codes(torch.tensor([math.nan]))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (-1.0, 3.0), (2.0, 2.5), (-0.5, 0.1)])
def test_fit_zero_point_covers_the_range(signed, lo, hi):
    fmt = fixed(8, 4, signed=signed).fit_zero_point(lo, hi)
    full_lo, full_hi = (-128, 127) if signed else (0, 255)
    assert full_lo <= fmt.zero_point <= full_hi
    # the span of 8.4 is 16 > hi - lo: a centred zero point puts the whole range inside
    assert fmt.min_value <= lo and hi <= fmt.max_value
    centre = (fmt.min_value + fmt.max_value) / 2
    assert abs(centre - (lo + hi) / 2) <= fmt.scale


def test_fit_zero_point_keeps_a_narrow_range():
    fmt = fixed(8, 4, narrow=True).fit_zero_point(-8.0, -7.0)
    # centre code (-127 + 127) / 2 = 0 sits on the range's centre -7.5 = -120 steps
    assert fmt.narrow and fmt.zero_point == 120 and fmt.code_min == -127


@pytest.mark.parametrize("old, new, named", [
    ("16.8,symmetric", "16.8,narrow", "'16.8,narrow'"),
    ("16.8,asymmetric", "16.8", "full range is the default"),
    ("16.8,asymmetric,zp=-3", "16.8,zp=-3", "full range is the default"),
    ("u8.4,symmetric", "u8.4", "'u8.4,narrow'"),  # the old mode narrowed only signed saturating formats
    ("8.4,symmetric,wrap", "8.4,wrap", "'8.4,narrow'"),
])
def test_old_mode_strings_warn_naming_the_new_spelling(old, new, named):
    with pytest.warns(DeprecationWarning, match=named):
        fmt = FixedPoint.parse(old)
    assert fmt == FixedPoint.parse(new)


@pytest.mark.parametrize("kwargs, new, named", [
    (dict(mode="symmetric"), fixed(16, 8, narrow=True), "narrow=True"),
    (dict(mode="asymmetric", zero_point=3), fixed(16, 8, zero_point=3), "zero_point="),
    (dict(mode="symmetric", overflow="wrap"), fixed(16, 8, overflow="wrap"), "narrow=True"),
])
def test_old_mode_field_warns_naming_the_new_spelling(kwargs, new, named):
    with pytest.warns(DeprecationWarning, match=named):
        assert FixedPoint(16, 8, **kwargs) == new
    with pytest.warns(DeprecationWarning, match=named):
        assert FixedPoint.from_dict({"bits": 16, "frac": 8, **kwargs}) == new


@pytest.mark.parametrize("text, first, second", [
    ("16.8,stochastic,floor", "stochastic", "floor"),
    ("16.8,wrap,saturate", "wrap", "saturate"),
    ("16.8,zp=1,zp=2", "zp=1", "zp=2"),
    ("16.8,narrow,asymmetric", "narrow", "asymmetric"),
    ("16.8,symmetric,zp=3", "symmetric", "zp=3"),
])
def test_conflicting_options_name_both(text, first, second):
    with warnings.catch_warnings(), pytest.raises(FormatError, match=rf"'{first}' and '{second}'"):
        warnings.simplefilter("ignore", DeprecationWarning)
        FixedPoint.parse(text)


def test_repeating_an_option_is_not_a_conflict():
    assert FixedPoint.parse("16.8,floor,floor,narrow,narrow") == fixed(16, 8, rounding="floor", narrow=True)


def test_formats_are_hashable_and_immutable():
    assert len({fixed(16, 8), FixedPoint.parse("16.8"), fixed(16, 10)}) == 2
    with pytest.raises(Exception):
        fixed(16, 8).bits = 4
