"""`stream: true` on POST /v1/images/generations: OpenAI's image streaming events, as server-sent events.

    event: image_generation.partial_image   {type, b64_json, partial_image_index, size, output_format, ...}
    event: image_generation.completed       {type, b64_json, size, output_format, ...}   (one per image)
    event: error                            {error: {message, type, param, code}}       (then the stream ends)

The partial images are the step previews the job's events carry (a small JPEG of the latents, not a decoded
image, so their output_format is "jpeg"): the first `partial_images` of them; fewer when the image is done first,
as OpenAI also allows. OpenAI's `usage` (token counts of its models) has no meaning here and is not sent.
A client that goes away cancels the job, as with the synchronous request.
"""

from __future__ import annotations

import asyncio
import base64
import time

from zimage.server.events import TERMINAL_EVENTS, format_sse


async def image_events(state, job, body, request, poll_s: float):
    from zimage.server.routes import unavailable

    queue = state.hub.subscribe(job.id)
    p = job.params
    common = {"size": f"{p['width']}x{p['height']}", "quality": body.quality or "auto", "background": "opaque"}
    sent, finished = 0, False
    try:
        while not job.terminal:
            try:
                event, data = await asyncio.wait_for(queue.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                event, data = None, None
            if event == "preview" and sent < (body.partial_images or 0):
                jpeg = data["image"].split(",", 1)[1]  # a data URL: data:image/jpeg;base64,<...>
                yield format_sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": jpeg, "partial_image_index": sent,
                    "created_at": int(time.time()), "output_format": "jpeg", **common})
                sent += 1
            if event is None or event in TERMINAL_EVENTS:
                job = await asyncio.to_thread(state.store.get, job.id)
            if event is None and not job.terminal and (reason := state.worker.unavailable()) is not None:
                yield format_sse("error", unavailable(reason).body())
                return
        finished = True
        if job.status != "succeeded":
            err = job.error or {"message": f"the job was {job.status}", "code": job.status}
            yield format_sse("error", {"error": {"message": err["message"], "type": err.get("type", "server_error"),
                                                 "param": None, "code": err.get("code")}})
            return
        for img in job.images:
            raw = await asyncio.to_thread((state.store.images_dir / img["id"]).read_bytes)
            yield format_sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": base64.b64encode(raw).decode(),
                "created_at": int(time.time()), "output_format": p["output_format"], "seed": img["seed"], **common})
    finally:
        state.hub.unsubscribe(job.id, queue)
        if not finished:  # the client went away (the response was cancelled) or the server cannot run it
            await asyncio.to_thread(state.worker.cancel, job.id)
