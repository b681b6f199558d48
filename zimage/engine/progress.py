"""tqdm progress bars for long work (loading, denoising), or None when the caller did not ask for them."""

from __future__ import annotations


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "B"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)
