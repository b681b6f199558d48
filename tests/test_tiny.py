"""The tiny random model builder: deterministic per seed, and no change to the caller's random streams."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(f).items()})
    return out


def test_build_leaves_the_global_random_streams_alone_and_is_deterministic(tmp_path, tiny_folder):
    """Building seeds torch's generators only inside the build: the caller's CPU stream continues as if nothing had
    happened, no CUDA seed is queued for a later CUDA start (torch.manual_seed does that on a machine whose CUDA is
    not started yet), and seed 0 gives the weights of the session's tiny folder (also seed 0, built by conftest),
    bit for bit; another seed gives other weights."""
    from zimage.weights.tiny import build_model_folder

    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    queued = list(torch.cuda._lazy_seed_tracker.get_calls()) if hasattr(torch.cuda, "_lazy_seed_tracker") else None
    build_model_folder(tmp_path / "seed0", seed=0)
    assert torch.equal(torch.rand(4), expected_next)
    if queued is not None:
        assert list(torch.cuda._lazy_seed_tracker.get_calls()) == queued
    ours, session = tensors(tmp_path / "seed0"), tensors(tiny_folder)
    assert ours.keys() == session.keys()
    assert all(torch.equal(ours[k], session[k]) for k in ours)
    other = tensors(build_model_folder(tmp_path / "seed1", seed=1))
    assert any(not torch.equal(other[k], ours[k]) for k in ours)
