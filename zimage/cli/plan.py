"""`zimage plan`: the memory plan zimage would choose for a VRAM budget and an image size (no GPU needed)."""

from __future__ import annotations

from zimage.cli.common import add_model_flags


def register(sub) -> None:
    p = sub.add_parser("plan", help="show the memory plan and its predicted peak for a VRAM budget and size",
                       description="Print the memory plan zimage would choose (what is resident, streamed or "
                                   "offloaded) and its predicted peak GPU memory, for --vram-budget GiB (default: "
                                   "the GPU's free memory) at --width x --height: the same planning the engine does. "
                                   "Sizes come from the model folder's headers; when the folder is not on this "
                                   "machine (or with --model published), from the published shapes. Without a GPU "
                                   "(and --device auto) it plans for a CUDA GPU in bf16.")
    add_model_flags(p)
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (x2 with guidance) (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from zimage.cli.common import engine_config
    from zimage.engine.build import plan_memory, planning_sizes, planning_target
    from zimage.engine.device import dtype_name
    from zimage.errors import UsageError
    from zimage.memory.plan import GIB
    from zimage.sizes import check_side

    for name in ("width", "height"):
        check_side(name, getattr(args, name))
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}", param="batch")
    config = engine_config(args, show_progress=False)
    target = planning_target(config)
    sizes, source = planning_sizes(config, target)
    plan = plan_memory(config, target, sizes, args.width, args.height, args.batch)
    print(f"model sizes from {source}: transformer {sizes.transformer.total / GIB:.2f} GiB "
          f"({len(sizes.transformer.blocks)} blocks of {sizes.transformer.block / GIB:.2f}), text encoder "
          f"{sizes.text_encoder.total / GIB:.2f} GiB, VAE decoder {sizes.vae.total / GIB:.2f} GiB "
          f"({dtype_name(target.dtype)} on {target.device.type})")
    if target.device.type != "cuda":
        print(f"on {target.device.type} everything stays resident (a VRAM budget names GPU memory)")
    print(f"memory plan: {plan.describe()}")
    print("predicted peak per phase: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.phase_peaks))
    return 0
