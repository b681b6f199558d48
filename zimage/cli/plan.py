"""`zimage plan`: the memory plan zimage would choose for a VRAM budget and an image size (no GPU needed)."""

from __future__ import annotations

from zimage.cli.common import add_model_flags


def register(sub) -> None:
    p = sub.add_parser("plan", help="show the memory plan and its predicted peak for a VRAM budget and size",
                       description="Print the memory plan zimage would choose (what is resident, streamed or "
                                   "offloaded) and its predicted peak GPU memory, for --vram-budget GiB (default: "
                                   "the GPU's free memory) at --width x --height. Sizes come from the model folder's "
                                   "headers; with --model published, from the published shapes (no folder needed).")
    add_model_flags(p)
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (x2 with guidance) (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from zimage.engine.config import EngineConfig
    from zimage.errors import UsageError
    from zimage.memory.plan import GIB
    from zimage.memory.planner import choose_plan
    from zimage.memory.select import budget_bytes
    from zimage.sizes import check_side

    for name in ("width", "height"):
        check_side(name, getattr(args, name))
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}", param="batch")
    if args.model == "published":
        from zimage.memory.sizes import published_model_sizes

        sizes, source = published_model_sizes(), "the published Z-Image-Turbo shapes"
    else:
        from zimage.memory.sizes import model_sizes
        from zimage.weights.check import check_model_folder
        from zimage.weights.locate import locate_model

        loc = locate_model(args.model)
        sizes, source = model_sizes(check_model_folder(loc.path)), str(loc.path)
    device = torch.device("cuda") if args.vram_budget is None and torch.cuda.is_available() else torch.device("cpu")
    budget = budget_bytes(EngineConfig(vram_budget_gib=args.vram_budget), device)
    if budget is None:
        raise UsageError("no GPU is visible: give the budget to plan for with --vram-budget GIB", param="vram_budget")
    plan = choose_plan(budget, sizes, args.width, args.height, args.batch, fp8=args.fp8)
    print(f"model sizes from {source}: transformer {sizes.transformer.total / GIB:.2f} GiB "
          f"({len(sizes.transformer.blocks)} blocks of {sizes.transformer.block / GIB:.2f}), text encoder "
          f"{sizes.text_encoder.total / GIB:.2f} GiB, VAE decoder {sizes.vae.total / GIB:.2f} GiB (bf16)")
    print(f"memory plan: {plan.describe()}")
    print("predicted peak per phase: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.phase_peaks))
    return 0
