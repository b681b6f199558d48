"""`zimage generate`: prompts in, PNGs out (each carrying how it was made). The model loads once for all prompts.

Every input is validated and every output name planned before the model loads, so mistakes cost no waiting.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from zimage.cli.common import add_model_flags, engine_config
from zimage.engine.config import EngineConfig
from zimage.errors import UsageError
from zimage.recipe import BASE, TURBO
from zimage.request import DEFAULT_SIZE, MAX_PROMPT_CHARS, GenerateRequest
from zimage.sizes import ASPECT_PRESETS, size_for_aspect
from zimage.weights.layout import DEFAULT_MODEL_ID, TINY_MODEL_ID

log = logging.getLogger("zimage")


def register(sub) -> None:
    p = sub.add_parser("generate", help="make images from prompts",
                       description="Make images from a prompt, a prompts file, or the parameters stored in a PNG.")
    src = p.add_argument_group("what to make")
    src.add_argument("--prompt", "-p", help=f"the text to draw: at most {MAX_PROMPT_CHARS:,} characters, of which "
                                              f"the text encoder reads the first {EngineConfig.max_text_tokens} "
                                              "tokens (more are cut, with a warning)")
    src.add_argument("--prompts-file", type=Path, metavar="FILE",
                     help="one prompt a line, or JSONL with settings per line (keys: prompt, negative_prompt, width, "
                          "height, aspect, steps, guidance, seed, n, output)")
    src.add_argument("--from-png", type=Path, metavar="FILE",
                     help="remake the image whose parameters FILE carries, with the model it records (flags given "
                          "here override them, --model included)")
    src.add_argument("--negative-prompt", help=f"what to avoid, used only when --guidance > 0: at most "
                                                 f"{MAX_PROMPT_CHARS:,} characters")
    opt = p.add_argument_group("settings")
    opt.add_argument("--width", type=int, help=f"pixels, multiple of 16, 256..2048 (default {DEFAULT_SIZE})")
    opt.add_argument("--height", type=int, help=f"pixels, multiple of 16, 256..2048 (default {DEFAULT_SIZE})")
    opt.add_argument("--aspect", help=f"a trained size preset: {', '.join(ASPECT_PRESETS)}")
    opt.add_argument("--steps", type=int,
                     help=f"denoising steps = transformer forwards, x2 with --guidance > 0 (default: the model's "
                          f"recipe: {TURBO.steps} for Z-Image-Turbo, as its authors run it; {BASE.steps} for Z-Image)")
    opt.add_argument("--guidance", type=float,
                     help=f"CFG scale; 0 turns CFG off (default: the recipe's: {TURBO.guidance:g} for Turbo, "
                          f"{BASE.guidance:g} for Z-Image)")
    opt.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default: random)")
    opt.add_argument("--n", type=int, help="images per prompt (default 1)")
    img = p.add_argument_group("start from a picture (img2img, inpainting, outpainting)")
    img.add_argument("--image", type=Path, metavar="FILE",
                     help="a PNG, JPEG or WebP to start from (EXIF rotation applied, transparency on white); its own "
                          "size rounded down to a multiple of 16 unless --width/--height (then --resize)")
    img.add_argument("--strength", type=float,
                     help="how much is repainted, 0 < S <= 1: S x --steps forwards run (default 0.6, or 1 with "
                          "--mask)")
    img.add_argument("--mask", type=Path, metavar="FILE",
                     help="inpainting: white repaints, black keeps (the kept area is the input after the VAE's "
                          "encode and decode)")
    img.add_argument("--mask-blur", type=int, metavar="PX", help="smooth the mask's outline by a blur of PX pixels")
    img.add_argument("--resize", choices=("fit", "crop", "stretch"),
                     help="how an image (and mask) of another size meets --width x --height: fit inside and pad, "
                          "crop to fill, or stretch")
    img.add_argument("--outpaint", metavar="L,T,R,B",
                     help="outpainting: add L,T,R,B pixels of canvas around --image and paint them (a mask is built)")
    img.add_argument("--expand-to", metavar="WxH", help="outpainting: centre --image on a WxH canvas and paint the rest")
    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", default="./",
                     help="a .png file (several images: NAME-1.png, NAME-2.png, ...) or a folder ending in / "
                          "(default: current folder, names from prompt and seed)")
    out.add_argument("--overwrite", action="store_true", help="replace existing files")
    add_model_flags(p)
    p.set_defaults(func=run, model=DefaultModel(DEFAULT_MODEL_ID))


class DefaultModel(str):
    """--model's default, told apart from the same text typed by the user: argparse stores a default's own object
    when the flag is absent and a plain str from argv when it is given. --from-png needs to know which (the model
    the PNG records is used unless --model is given), and --help still prints the default as text."""


@dataclass
class Job:
    request: GenerateRequest
    paths: list[Path]
    label: str  # where it came from, for messages
    made_with: object = None  # --from-png: the PNG's ImageMetadata


def _settings_from_png(m) -> dict:
    return dict(prompt=m.prompt, negative_prompt=m.negative_prompt, width=m.width, height=m.height, steps=m.steps,
                guidance=m.guidance, seed=m.seed)


def model_to_load(args, jobs: list[Job]) -> str:
    """--model when given; else, for --from-png, the model the PNG records: a repo id (looked up in the caches as
    --model would be) or tiny-random. A PNG made from a folder records only the folder's name (an image may be
    shared; its path would say more than it should), so that one needs --model."""
    made_with = jobs[0].made_with
    if not isinstance(args.model, DefaultModel) or made_with is None:
        return str(args.model)
    recorded = made_with.model
    if recorded == TINY_MODEL_ID or (recorded.count("/") == 1 and not recorded.startswith((".", "/", "~"))):
        return recorded
    raise UsageError(f"{args.from_png} was made with the model in a folder named {recorded!r} (a PNG records a "
                     "folder's name, not its path); pass --model with that folder", param="model")


def _request(settings: dict, where: str, picture: dict | None = None) -> GenerateRequest:
    """Build a request from merged settings; size from aspect unless width/height are given (neither: 1024, or the
    input picture's own size). `picture`: the image-input fields (image, mask, strength, resize, mask_blur)."""
    width, height = settings.get("width"), settings.get("height")
    try:
        if settings.get("aspect") is not None:
            if width is not None or height is not None:
                raise UsageError("give either an aspect or a width/height, not both", param="aspect")
            width, height = size_for_aspect(settings["aspect"])
        return GenerateRequest(
            prompts=(settings.get("prompt") or "",),
            negative_prompt=settings.get("negative_prompt") or "",
            width=width, height=height,
            steps=settings.get("steps"), guidance=settings.get("guidance"),  # None: the model's recipe
            seed=settings.get("seed"),
            n=1 if settings.get("n") is None else settings["n"],
            **(picture or {}),
        )
    except UsageError as e:
        raise UsageError(f"{where}: {e}" if where != "arguments" else str(e), param=e.param) from None


def picture_fields(args, made_with=None) -> dict:
    """The image-input fields of the requests from --image, --mask, --strength, --resize, --mask-blur, --outpaint and
    --expand-to (with --from-png: what the PNG records, unless a flag says otherwise). Empty without an image."""
    from zimage.io.input_image import expand_to, load_image, outpaint, parse_margins
    from zimage.sizes import parse_size

    recorded_image = made_with.image if made_with is not None else None
    if args.image is None:
        if recorded_image is not None:
            raise UsageError(f"{args.from_png} was made from an input image ({recorded_image['source_width']}x"
                             f"{recorded_image['source_height']}, sha256 {recorded_image['sha256'][:12]}...); give it "
                             "with --image", param="image")
        for flag in ("mask", "strength", "resize", "mask_blur", "outpaint", "expand_to"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --image", param=flag)
        return {}
    if args.outpaint is not None and args.expand_to is not None:
        raise UsageError("give either --outpaint or --expand-to, not both", param="outpaint")
    image, mask = args.image, args.mask
    if args.outpaint is not None or args.expand_to is not None:
        if mask is not None:
            raise UsageError("--outpaint and --expand-to build the mask; leave out --mask", param="mask")
        if args.outpaint is not None:
            image, mask = outpaint(load_image(image), *parse_margins(args.outpaint))
        else:
            w, h = parse_size(args.expand_to)
            image, mask = expand_to(load_image(image), w, h)
    if made_with is not None and made_with.mask is not None and mask is None:
        raise UsageError(f"{args.from_png} was inpainted with a mask (sha256 {made_with.mask['sha256'][:12]}...); "
                         "give it with --mask", param="mask")
    strength = args.strength if args.strength is not None else getattr(made_with, "strength", None)
    resize = args.resize if args.resize is not None else getattr(made_with, "resize", None)
    recorded_blur = (made_with.mask or {}).get("blur", 0) if made_with is not None else 0
    blur = args.mask_blur if args.mask_blur is not None else recorded_blur
    return dict(image=image, mask=mask, strength=strength, resize=resize, mask_blur=blur)


def _note_other_inputs(args, made_with, request) -> None:
    """--from-png with another picture or mask than the one recorded makes another image: say so."""
    if made_with is None:
        return
    for what, recorded, given in (("image", made_with.image, request.image), ("mask", made_with.mask, request.mask)):
        if recorded is not None and given is not None and recorded["sha256"] != given.sha256:
            print(f"note: {args.from_png} was made from another {what} (sha256 {recorded['sha256'][:12]}..., this one "
                  f"{given.sha256[:12]}...), so the image will differ", file=sys.stderr)


def loras_to_apply(args, made_with) -> tuple:
    """--lora when given; else, for --from-png, the LoRAs the PNG records (each file checked to be there)."""
    from zimage.lora_spec import LoraSpec

    if args.lora or made_with is None or not made_with.loras:
        return tuple(args.lora)
    specs = []
    for lo in made_with.loras:
        if not Path(lo["file"]).expanduser().exists():
            raise UsageError(f"{args.from_png} was made with LoRA {lo['name']!r} (file {lo['file']}, sha256 "
                             f"{lo['sha256'][:12]}...), which is not there: give it with --lora FILE:{lo['scale']:g}",
                             param="lora")
        specs.append(LoraSpec(lo["file"], lo["scale"]))
    return tuple(specs)


def plan_jobs(args) -> list[Job]:
    from zimage.io.output_names import OutputPlanner
    from zimage.io.prompts_file import read_prompts_file

    sources = [s for s in (args.prompt, args.prompts_file, args.from_png) if s is not None]
    if len(sources) != 1:
        raise UsageError("give exactly one of --prompt, --prompts-file, --from-png", param="prompt")
    flags = {k: getattr(args, k) for k in ("negative_prompt", "width", "height", "aspect", "steps", "guidance",
                                           "seed", "n")}
    flags = {k: v for k, v in flags.items() if v is not None}
    if "aspect" in flags and ("width" in flags or "height" in flags):
        raise UsageError("give either --aspect or --width/--height, not both", param="aspect")
    planner = OutputPlanner(args.overwrite)
    jobs = []
    made_with = None
    if args.from_png is not None:
        from zimage.io.png import read_metadata

        made_with = read_metadata(args.from_png)
    picture = picture_fields(args, made_with)
    if args.prompts_file is not None:
        for line in read_prompts_file(args.prompts_file):
            where = f"{args.prompts_file}:{line.line}"
            settings = {**flags, **line.settings}
            if "aspect" in line.settings:  # the line's aspect replaces the flags' size (a line's own size: error)
                for k in ("width", "height"):
                    if k not in line.settings:
                        settings.pop(k, None)
            elif "width" in line.settings or "height" in line.settings:
                settings.pop("aspect", None)  # the line's own size replaces the flags' --aspect
            req = _request(settings, where, picture)
            output = line.settings.get("output", args.output)
            jobs.append(Job(req, planner.plan(output, req.image_prompts(), req.image_seeds()), where))
        return jobs
    base = _settings_from_png(made_with) if made_with is not None else {"prompt": args.prompt}
    settings = {**base, **flags}
    if "aspect" in flags:  # --aspect replaces the PNG's size
        settings.pop("width", None), settings.pop("height", None)
    req = _request(settings, "arguments", picture)
    return [Job(req, planner.plan(args.output, req.image_prompts(), req.image_seeds()), "arguments", made_with)]


def _warn_ignored_negative_prompt(args, jobs: list[Job]) -> None:
    """One warning a run when a negative prompt has no effect (guidance 0 turns classifier-free guidance off)."""
    where = [j.label for j in jobs if j.request.negative_prompt_ignored]
    if not where:
        return
    if args.prompts_file is None:
        what = "--negative-prompt" if args.negative_prompt is not None else f"the negative prompt of {args.from_png}"
        print(f"warning: {what} is used only with --guidance > 0; it is ignored", file=sys.stderr)
        return
    shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
    print(f"warning: a negative prompt is used only with guidance > 0; it is ignored for {shown}", file=sys.stderr)


def _note_other_revision(args, made_with, location) -> None:
    """The same repo id at another revision can make another image: say so rather than pass it off as a remake."""
    if made_with is None or location.model_id != made_with.model:
        return
    if made_with.model_revision and location.revision and made_with.model_revision != location.revision:
        print(f"note: {args.from_png} was made with revision {made_with.model_revision[:10]} of {made_with.model}; "
              f"the one found is {location.revision[:10]}, so the image may differ", file=sys.stderr)


def run(args) -> int:
    from tqdm import tqdm

    from zimage.engine.build import recipe_of
    from zimage.engine.driver_init import start_in_background
    from zimage.engine.engine import Engine
    from zimage.io.output_names import create_folder
    from zimage.io.png import save_png

    jobs = plan_jobs(args)  # all validation before the model loads
    model = model_to_load(args, jobs)
    loras = loras_to_apply(args, jobs[0].made_with)
    config = replace(engine_config(args, show_progress=True), model=model, loras=loras)
    recipe, _ = recipe_of(config)  # the model's defaults of steps and guidance, before it loads
    for job in jobs:
        job.request = job.request.with_recipe(recipe)
    _warn_ignored_negative_prompt(args, jobs)
    _note_other_inputs(args, jobs[0].made_with, jobs[0].request)
    first = jobs[0].request
    for part in (first.image, first.mask):
        for note in part.notes if part is not None else ():
            print(f"note: {note}", file=sys.stderr)
    start_in_background(args.device)  # CUDA's driver start-up overlaps the import of torch (cold start)
    total = sum(j.request.num_images for j in jobs)
    config = engine_config(args, show_progress=True, expected_images=total, first=jobs[0].request)
    engine = Engine.load(replace(config, model=model, loras=loras))
    _note_other_revision(args, jobs[0].made_with, engine.location)
    if engine.location.source == "tiny":
        print("note: --model tiny-random is a tiny randomly initialised stand-in; its images are noise. "
              "Run `zimage download` for the real weights.", file=sys.stderr)
    # `with`: an error closes the bar before main() prints the message, which then stays the last line.
    with tqdm(total=total, desc="images", unit="img", disable=total < 2) as bar:
        for job in jobs:
            result = engine.generate(job.request)
            for img, path in zip(result.images, job.paths):
                create_folder(path.parent)
                save_png(img.image, path, img.metadata, overwrite=args.overwrite)
                log.debug("saved %s", path)
                print(path)
            bar.update(len(result.images))
            t = result.timings
            bar.write(f"{len(result.images)} image(s) in {t['total']:.2f}s (encode {t['encode']:.2f}s, denoise "
                      f"{t['denoise']:.2f}s, decode {t['decode']:.2f}s)", file=sys.stderr)
    return 0
