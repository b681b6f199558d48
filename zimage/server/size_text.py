"""A size as the API and `zimage serve`'s flags write it: 'WIDTHxHEIGHT', ASCII digits only.

Checked here before zimage.sizes.parse_size sees it: str.isdigit() there accepts digits such as '²' that int()
then refuses (a 500), and int() of more than 4300 digits raises; and a side below the minimum is named as out of
range, not as a non-multiple of 16 with "nearest" values that are themselves out of range.
"""

from __future__ import annotations

import re

from zimage.errors import UsageError
from zimage.sizes import MAX_SIDE, MIN_SIDE, parse_size

SIZE_PATTERN = r"^[0-9]{1,5}x[0-9]{1,5}$"
_SIZE = re.compile(SIZE_PATTERN, re.ASCII)


def parse_size_text(text: str, param: str = "size") -> tuple[int, int]:
    """'1024x768' -> (1024, 768), or a UsageError naming `param`, the value and what is allowed."""
    if not isinstance(text, str) or not _SIZE.match(text):
        shown = text[:40] + "..." if isinstance(text, str) and len(text) > 40 else text
        raise UsageError(f"{param} must look like WIDTHxHEIGHT in digits 0-9 (e.g. 1024x1024), got {shown!r}",
                         param=param)
    for name, side in zip(("width", "height"), text.split("x")):
        if not MIN_SIDE <= int(side) <= MAX_SIDE:
            raise UsageError(f"{param}: {name} must be between {MIN_SIDE} and {MAX_SIDE}, got {int(side)}",
                             param=param)
    try:
        return parse_size(text)
    except UsageError as e:
        raise UsageError(f"{param}: {e}", param=param) from None
