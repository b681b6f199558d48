"""zimage: a fast, memory-smart engine for the Z-Image-Turbo text-to-image model.

Importing this package is cheap: torch, diffusers and transformers are imported only when an
engine is loaded (a CLI `--help` or a server's argument parsing never pays for them).

    from zimage import Engine, EngineConfig, GenerateRequest
    engine = Engine.load(EngineConfig(model="Tongyi-MAI/Z-Image-Turbo"))
    result = engine.generate(GenerateRequest(prompts=("a cat in the snow",), seed=42))
    result.images[0].image.save("cat.png")  # a GeneratedImage: .image (PIL), .metadata (how it was made)

(`zimage.io.png.save_png(image.image, path, image.metadata)` also writes the generation parameters into the PNG.)
"""

from zimage.version import __version__
from zimage.errors import ZImageError, UsageError
from zimage.request import GenerateRequest

__all__ = ["__version__", "ZImageError", "UsageError", "GenerateRequest", "Engine", "EngineConfig"]


def __getattr__(name: str):
    # Lazy: `Engine` pulls in torch; keep `import zimage` light.
    if name == "Engine":
        from zimage.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from zimage.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'zimage' has no attribute {name!r}")
