"""LoRAs over HTTP: the names a request gives, checked when it is submitted, and GET /v1/loras.

A client names LoRAs; it never gives a path. Names resolve only in the server's folder (`serve --lora-dir`), through
the engine's own LoraLibrary (zimage.engine.loras), so that the rules for what a name is are the engine's. Every
check here runs before the job is accepted: a bad LoRA is a 400 to the client that sent it, not a failed job later
(or, worse, a failed batch that other clients' jobs shared).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from zimage.errors import UsageError
from zimage.server.errors import ApiError

ENABLE_HINT = "start the server with --lora-dir DIR (the LoRAs clients may name; --lora-slots N sets how many " \
              "different sets one batch can mix)"


class LoraInfo(BaseModel):
    name: str = Field(..., description="What a request's `loras[].name` gives.")
    file: str = Field(..., description="The file (or PEFT folder) name in the server's LoRA folder.")
    merged: bool = Field(False, description="Part of the set merged into the weights for every image "
                                            "(serve --lora), at `merged_scale`.")
    merged_scale: float | None = None
    sha256: str | None = None
    short_hash: str | None = Field(None, description="The 12 hex digits AUTOMATIC1111 writes in 'Lora hashes'.")
    rank: int | None = Field(None, description="The largest rank of its factors.")
    layout: str | None = Field(None, description="The layout detected: peft, diffusers, ai-toolkit, kohya, ...")
    targets: int | None = Field(None, description="Modules it changes (transformer and text encoder).")
    size_bytes: int | None = None
    error: str | None = Field(None, description="Why the file cannot be used (it failed to read); then only name, "
                                                "file and size are given.")


class MergedLora(BaseModel):
    name: str = Field(..., description="The LoRA's name (its file name without .safetensors).")
    scale: float
    sha256: str | None = None
    short_hash: str | None = None


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraInfo]
    runtime: bool = Field(False, description="Requests may name LoRAs (the server has --lora-dir and runtime "
                                             "slots).")
    merged: list[MergedLora] = Field([], description="The set merged into the weights for every image "
                                                     "(serve --lora), whether or not its files are in the folder.")


def lora_config(state):
    """The LoRA settings in force: the loaded engine's own config when it has one (tests hand in an engine), else
    the settings' (the model is still loading, or the engine is remote)."""
    return getattr(state.worker.engine, "config", None) or state.settings.engine


def _library(state):
    """The engine's LoraLibrary when loaded (its cache of read files is shared with generation), else a new one."""
    from zimage.engine.loras import LoraLibrary

    loras = getattr(state.worker.engine, "loras", None)
    library = getattr(loras, "library", None)
    return library if library is not None else LoraLibrary(lora_config(state).lora_dir)


def check_name(name: str) -> None:
    """A name, not a path: refused before anything is read (a client must not probe the server's files)."""
    if "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or Path(name).is_absolute():
        raise ApiError(400, f"LoRA name {name!r} is not allowed: give a name listed by GET /v1/loras, without '/', "
                            "'\\' or a leading '.' (a path is never accepted)", "invalid_lora_name", "loras")


def check_request_loras(state, specs) -> None:
    """Everything about a request's LoRAs that can be known when it is submitted (runs in a thread: it reads files).
    Raises ApiError (400) naming the LoRA and what is allowed."""
    if not specs:
        return
    config = lora_config(state)
    if not config.lora_dir or not config.lora_slots:
        raise ApiError(400, f"this server takes no LoRAs in requests: {ENABLE_HINT}", "loras_disabled", "loras")
    for spec in specs:
        check_name(spec.name)
    library = _library(state)
    for spec in specs:
        try:
            library.path_of(spec.name, names_only=True)
        except UsageError:
            have = ", ".join(library.names()) or "none"
            raise ApiError(400, f"no LoRA named {spec.name!r} in the server's LoRA folder; it has: {have}",
                           "unknown_lora", "loras") from None
    engine_loras = getattr(state.worker.engine, "loras", None)
    if hasattr(engine_loras, "check_runtime"):  # loaded here: read the files, check them against the networks
        try:
            engine_loras.check_runtime(specs, names_only=True)
        except UsageError as e:
            raise ApiError(400, _public(str(e), library), "invalid_lora", "loras") from None


def list_loras(state) -> LoraList:
    """The folder's LoRAs, each read (cached by size and mtime); a file that fails to read is listed with its error
    rather than breaking the list."""
    config = lora_config(state)
    merged = _merged(state, config)
    scales = {m.sha256 or m.name: m.scale for m in merged}
    library = _library(state)
    data = [_info(name, got, scales, library) for name, got in library.available()]
    return LoraList(data=data, runtime=bool(config.lora_dir and config.lora_slots), merged=merged)


def _merged(state, config) -> list[MergedLora]:
    """The merged set: read (with hashes) once the engine is loaded, else the names the server was started with."""
    engine_loras = getattr(state.worker.engine, "loras", None)
    if getattr(engine_loras, "merged", None):
        return [MergedLora(name=lora.name, scale=scale, sha256=lora.sha256, short_hash=lora.short_hash)
                for lora, scale in engine_loras.merged]
    return [MergedLora(name=Path(spec.name).name, scale=spec.scale) for spec in config.loras]


def _public(message: str, library) -> str:
    """A message without the server's folder: clients see file names, not where the server keeps them."""
    return message.replace(f"{library.dir}{os.sep}", "") if library.dir is not None else message


def _info(name: str, got, merged: dict, library) -> LoraInfo:
    from zimage.weights.lora import LoraFile

    if not isinstance(got, LoraFile):  # the LoraError reading it raised
        path = Path(getattr(got, "path", "") or name)
        return LoraInfo(name=name, file=path.name, size_bytes=_size(path), error=_public(str(got), library))
    scale = merged.get(got.sha256, merged.get(name))
    factors = [f for network in got.networks.values() for f in network.values()]
    return LoraInfo(name=name, file=got.path.name, merged=scale is not None, merged_scale=scale, sha256=got.sha256,
                    short_hash=got.short_hash, rank=max((f.down.shape[0] for f in factors), default=0),
                    layout=got.format, targets=len(factors), size_bytes=_size(got.path))


def _size(path: Path) -> int | None:
    """Bytes of the file, or of every file of a PEFT folder; None when it cannot be read."""
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        return None


def build_lora_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/loras", response_model=LoraList, tags=["loras"], response_model_exclude_none=True)
    async def loras(request: Request):
        """The LoRAs requests may name (the server's --lora-dir), read and described; those merged into the
        weights for every image (serve --lora) are marked. A file that cannot be read is listed with its error."""
        from zimage.server.app import get_state

        return await asyncio.to_thread(list_loras, get_state(request))

    return router
