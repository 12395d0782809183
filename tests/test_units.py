"""One reading of sizes for every option: binary unless the text says GB/MB (decimal, as disks are sold)."""

import pytest

from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.units import human_bytes, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        ("900M", 900 * 2**20),
        ("12G", 12 * 2**30),
        ("12GiB", 12 * 2**30),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("11.5GB", 11_500_000_000),
        ("512mb", 512_000_000),
        (" 2T ", 2 * 2**40),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["twelve", "", "12 GiBs", "-1G", "1.2.3G"])
def test_parse_size_rejects_with_a_hint(text):
    with pytest.raises(EdgeMoEError, match="cannot read the size") as e:
        parse_size(text)
    assert "12GiB" in e.value.hint


def test_human_bytes_round_trips_through_parse_size():
    for n in (512, 3 * 2**20, 11 * 2**30 + 2**29):
        assert abs(parse_size(human_bytes(n).replace(" ", "")) - n) <= n * 0.005
