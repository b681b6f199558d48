"""`zimage info`: what this machine has, where the model is, and what would run."""

from __future__ import annotations

from zimage.cli.common import add_model_flags


def register(sub) -> None:
    p = sub.add_parser("info", help="show torch/CUDA/GPU, where the model was found and what would run")
    add_model_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from zimage.cli.common import engine_config
    from zimage.engine.build import model_sizes_of, plan_memory, resolve_target
    from zimage.engine.device import dtype_name
    from zimage.errors import ZImageError
    from zimage.version import __version__
    from zimage.weights.check import check_model_folder
    from zimage.weights.locate import locate_model

    print(f"zimage {__version__}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            bf16 = torch.cuda.get_device_capability(i) >= (8, 0)
            print(f"  cuda:{i} {name}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, bf16 {'yes' if bf16 else 'no'}")
    else:
        print("  no CUDA GPU visible")
    config = engine_config(args, show_progress=False)
    target = resolve_target(config)
    print(f"would run on {target.device} in {dtype_name(target.dtype)}")
    try:
        loc = locate_model(args.model)
    except ZImageError as e:
        print(f"model: NOT FOUND\n{e}")
        return 1
    print(f"model: {loc.model_id} ({loc.source}) at {loc.path}" + (f", revision {loc.revision}" if loc.revision else ""))
    from zimage.engine.build import recipe_of

    recipe, why = recipe_of(config)
    print(f"recipe: {recipe.name} ({why}): {recipe.steps} steps, guidance {recipe.guidance:g} by default")
    checked = check_model_folder(loc.path)
    for name, c in checked.items():
        print(f"  {name}: {len(c.tensors)} tensors, {c.nbytes / 2**30:.2f} GiB on disk (used part)")
    plan = plan_memory(config, target, model_sizes_of(checked, target, config))
    print(f"memory plan: {plan.describe()}")
    return 0
