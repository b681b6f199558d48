"""Prompt -> caption embeddings, as diffusers' ZImagePipeline computes them, without its padding to 512.

Each prompt goes through the chat template (user turn + generation prompt, thinking enabled, as the reference),
is tokenised (at most `max_tokens`; more is dropped with a warning that says how many), and the text encoder
(cut after layer L-2, see zimage.weights.networks) gives one (L_i, hidden) tensor per prompt, L_i its real length.
Padding to the longest prompt of the batch instead of to 512 is exact: the encoder is causal and padding is on
the right, so real tokens never see it.
"""

from __future__ import annotations

from collections import OrderedDict


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, device, max_tokens: int = 512, cache_size: int = 32):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()  # prompt -> (L, hidden) tensor on `device`
        self.hits = 0
        self.misses = 0

    def template(self, prompt: str) -> str:
        return self.tokenizer.template(prompt)

    def count_tokens(self, prompt: str) -> int:
        return self.tokenizer.count_tokens(self.template(prompt))

    def truncation_warnings(self, prompts: list[str]) -> list[str]:
        out = []
        for i, p in enumerate(dict.fromkeys(prompts)):
            n = self.count_tokens(p)
            if n > self.max_tokens:
                out.append(
                    f"prompt {i + 1} is {n} tokens long (with the chat template); the text encoder reads at most "
                    f"{self.max_tokens}, so the last {n - self.max_tokens} tokens were dropped"
                )
        return out

    def cached(self, prompt: str) -> bool:
        return prompt in self._cache

    def encode(self, prompts: list[str]) -> list:
        """One (L_i, hidden) embedding per prompt (duplicates share one tensor). Uses and fills the cache."""
        import torch

        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        # This call's embeddings, taken before new entries may evict cached ones (or each other).
        fresh = {p: self._cache[p] for p in dict.fromkeys(prompts) if p in self._cache}
        if todo:
            ids, mask = self.tokenizer.encode([self.template(p) for p in todo], self.max_tokens)  # (B, L_max) each
            with torch.inference_mode():
                hidden = self.text_encoder(ids.to(self.device), mask.to(self.device).bool())  # (B, L_max, D)
            lengths = mask.sum(dim=1).tolist()  # on the CPU already: no device sync
            for p, h, n in zip(todo, hidden, lengths):
                fresh[p] = h[:n].clone()
                self._put(p, fresh[p])
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)  # recently used
        return [fresh[p] for p in prompts]

    def _put(self, prompt: str, embedding) -> None:
        self._cache[prompt] = embedding
        while len(self._cache) > max(self.cache_size, 1):
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()
