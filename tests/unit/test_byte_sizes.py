"""--kv-cache-memory spellings: decimal and binary units, bare bytes, and clear errors for the rest."""

from __future__ import annotations

import pytest

from tokenmill.byte_sizes import format_bytes, parse_byte_size
from tokenmill.errors import ConfigError


@pytest.mark.parametrize(("text", "size"), [
    ("4GiB", 4 << 30), ("500MB", 500_000_000), ("1.5G", 3 << 29), ("2gb", 2_000_000_000), ("64 KiB", 65536),
    ("1073741824", 1 << 30), (" 3 mib ", 3 << 20), ("10B", 10), (123456, 123456),
])
def test_sizes_parse_to_bytes(text: str | int, size: int) -> None:
    assert parse_byte_size("kv_cache_memory", text) == size


@pytest.mark.parametrize("text", ["", "GiB", "4 GiBs", "-1GiB", "1e9", "four", True, 2.5, None])
def test_what_is_not_a_size_is_a_config_error_naming_the_setting(text: object) -> None:
    with pytest.raises(ConfigError, match="a byte size such as 4GiB, 500MB") as info:
        parse_byte_size("kv_cache_memory", text)
    assert info.value.setting == "kv_cache_memory"


def test_a_size_under_one_byte_is_refused() -> None:
    with pytest.raises(ConfigError, match="more than 0 bytes, got '0.1B'"):
        parse_byte_size("kv_cache_memory", "0.1B")


def test_format_bytes_picks_a_readable_unit() -> None:
    assert [format_bytes(n) for n in (12, 2048, 3 << 29, 5 << 20)] == ["12 B", "2.00 KiB", "1.50 GiB", "5.00 MiB"]
