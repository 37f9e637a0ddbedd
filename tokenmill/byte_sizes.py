"""Byte sizes as users write them ("4GiB", "500MB", "1073741824") and as we print them."""

from __future__ import annotations

import re

from tokenmill.errors import ConfigError

# Decimal units are powers of 1000 and binary ones of 1024, as the SI/IEC names say; a bare number is bytes.
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}  # k/m/g/t: binary, like `ls -h` and docker
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_byte_size(setting: str, value: object) -> int:
    """Bytes from an int or a string such as '4GiB', '500MB', '1.5G'; ConfigError(setting) if it is not one."""
    if isinstance(value, bool):
        raise ConfigError(setting, f"must be a byte size such as 4GiB, 500MB or 1073741824, got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)) and match.group(2).lower() in _UNITS:
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ConfigError(setting, f"must be a byte size such as 4GiB, 500MB or 1073741824, got {value!r}")
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ConfigError(setting, f"must be more than 0 bytes, got {value!r}")
    return size


def format_bytes(size: int | float) -> str:
    """'3.50 GiB', '512.0 MiB', '12 B': for messages that tell a user how much memory something takes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"
