"""Milliseconds per transformer forward at 1024x1024 for each eager lever, to choose eager's defaults.

    python benchmarks/bench_forward_variants.py [--out DIR]

Random full-size transformer built directly on the GPU (no folder needed); one caption of 32 tokens.
Variants: diffusers' own forward; zimage's step function with {fused, unfused} projections x {cuDNN, PyTorch's
default} attention. CUDA-event medians after warm-up. Writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import cuda_ms, environment, write_json


def main() -> None:
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage.models.z_image import ZImageTransformer
    from zimage.speed.attention import set_attention_backend
    from zimage.speed.fuse import fuse_block
    from zimage.weights.tiny import FULL_TRANSFORMER

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ZImageTransformer2DModel(**FULL_TRANSFORMER).to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    cap = torch.randn(32, 2560, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1,), 0.5, device="cuda")
    res = {"env": environment()}
    with torch.inference_mode():
        res["diffusers_forward_ms"] = cuda_ms(lambda: model(list(x.unsqueeze(2).unbind(0)), t, [cap], return_dict=False))
        ours = ZImageTransformer(dict(model.config)).to("cuda", torch.bfloat16).eval().requires_grad_(False)
        ours.load_state_dict(model.state_dict())  # the same weights in zimage's module tree
        del model
        for backend in ("native", "cudnn"):
            set_attention_backend(ours, backend)
            ctx = ours.prepare([cap], 128, 128)
            res[f"zimage_unfused_{backend}_ms"] = cuda_ms(lambda: ours(x, t, ctx))
        for block in ours.blocks():
            fuse_block(block)
        for backend in ("native", "cudnn"):
            set_attention_backend(ours, backend)
            ctx = ours.prepare([cap], 128, 128)
            res[f"zimage_fused_{backend}_ms"] = cuda_ms(lambda: ours(x, t, ctx))
    for k, v in res.items():
        print(k, v)
    print("wrote", write_json("forward_variants", res, args.out))


if __name__ == "__main__":
    main()
