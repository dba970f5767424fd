"""The reference log-prob engine: completion-token log-probs, dynamically batched."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignd_server.common.batching import BatcherMetrics, DynamicBatcher
from alignd_server.common.config import BatchingServerSettings
from alignd_server.common.forward import completion_logprobs, pad_right
from alignd_server.common.models import LoadedModel


class LogprobEngine:
    """Computes log pi_ref of completion tokens for batches gathered across requests."""

    def __init__(
        self, loaded: LoadedModel, settings: BatchingServerSettings, metrics: BatcherMetrics
    ) -> None:
        self.loaded = loaded
        embeddings = loaded.model.get_input_embeddings().num_embeddings
        #: Ids in [0, vocab_size) are accepted: known to the tokenizer and the embedding.
        self.vocab_size = min(loaded.vocab_size, embeddings)
        self._pad_id = loaded.tokenizer.pad_token_id
        self.batcher = DynamicBatcher(
            "reference",
            self._run,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_size=settings.max_queue_size,
            metrics=metrics,
        )

    async def logprobs(
        self,
        rows: Sequence[np.ndarray],
        prompt_lengths: Sequence[int],
        temperature: float,
        deadline: float | None,
        isolated: bool = False,
    ) -> list[np.ndarray]:
        """(T_i - p_i,) float32 log softmax(logits / temperature) of each row's completion
        (``isolated``: batched only with each other)."""
        items = [(row, p, temperature) for row, p in zip(rows, prompt_lengths, strict=True)]
        return await self.batcher.submit(items, [len(r) for r in rows], deadline, isolated=isolated)

    def _run(self, items: list[tuple[np.ndarray, int, float]]) -> list[np.ndarray]:
        """Items of one temperature share a forward pass (temperature is almost always 1)."""
        out: list[np.ndarray | None] = [None] * len(items)
        for temperature in {t for _, _, t in items}:
            index = [i for i, item in enumerate(items) if item[2] == temperature]
            rows = self._forward([items[i][0] for i in index], [items[i][1] for i in index],
                                 temperature)  # fmt: skip
            for i, row in zip(index, rows, strict=True):
                out[i] = row
        return out

    def _forward(
        self, rows: list[np.ndarray], prompt_lengths: list[int], temperature: float
    ) -> list[np.ndarray]:
        with torch.inference_mode():
            ids, mask, lengths = pad_right(rows, self._pad_id, self.loaded.device)
            prompts = torch.tensor(prompt_lengths, device=ids.device)
            logprobs = completion_logprobs(
                self.loaded.model, ids, mask, lengths, prompts, temperature
            )
            return [row.cpu().numpy() for row in logprobs]
