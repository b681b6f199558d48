"""Work for the first image done while the transformer is still being read (cold start).

Reading the 6B transformer takes the longest part of loading, and the GPU computes nothing meanwhile: its reads use
the copy engines. So once the text encoder and the VAE are on the device, a side thread
- encodes the prompts the caller already knows (the CLI passes its first ones) into the prompt cache, so the first
  generate skips the text encoder; this also pays cuBLAS's and the attention kernels' one-time start-up;
- decodes a zero latent at the first image's size (eager speed only: compile mode replaces the decoder), which
  pays cuDNN's start-up and loads the convolution kernels the first decode uses.
Results are exactly those of doing the same work later (same modules, same inputs). Only for plans that keep both
networks on the device whole: under an offloading plan their memory policy moves weights per phase.
A failure here (an out-of-memory, say) is logged and dropped: the first generate does the work again and handles it.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("zimage")


class WarmStart:
    def __init__(self, prompts, vae, device, prompt_texts: tuple[str, ...], size: tuple[int, int] | None):
        self._prompts = prompts  # zimage.engine.text.PromptEncoder
        self._vae = vae
        self._device = device
        self._texts = list(dict.fromkeys(prompt_texts))
        self._size = size  # (width, height) pixels of the VAE warm-up, or None for none
        self._thread = threading.Thread(target=self._run, name="zimage-warm-start", daemon=True)

    @classmethod
    def start(cls, prompts, vae, device, prompt_texts=(), size=None) -> "WarmStart | None":
        """Begin in a thread when there is something to do on a GPU; None otherwise."""
        if not worth_it(device, prompts.text_encoder, vae, prompt_texts, size):
            return None
        warm = cls(prompts, vae, device, tuple(prompt_texts), size)
        warm._thread.start()
        return warm

    def _run(self) -> None:
        import torch

        cuda = self._device.type == "cuda"
        try:
            if cuda:
                torch.cuda.set_device(self._device)  # the thread's current device (a new thread starts on cuda:0)
            if self._texts:
                self._prompts.encode(self._texts)
            if self._size is not None:
                from zimage.engine.decode import decode_latents

                w, h = self._size
                channels = self._vae.config.latent_channels
                decode_latents(self._vae, torch.zeros(1, channels, h // 8, w // 8, device=self._device))
            if cuda:
                torch.cuda.synchronize(self._device)
        except Exception as e:  # noqa: BLE001 - the first generate redoes this work and reports its own errors
            log.warning("warm start skipped (%s: %s); the first image does this work instead", type(e).__name__, e)

    def join(self) -> None:
        self._thread.join()


def worth_it(device, text_encoder, vae, prompt_texts, size) -> bool:
    """On a GPU (on a CPU the threads would only compete for the cores that read the weights), with something to
    do, and both networks wholly on the device."""
    from zimage.engine.device import on_device

    if device.type != "cuda" or not (prompt_texts or size):
        return False
    return on_device(text_encoder, device) and on_device(vae, device)
