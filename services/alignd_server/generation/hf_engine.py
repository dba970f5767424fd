"""The ``hf`` engine: batched decoding with a KV cache on a transformers causal LM.

One request is one batch (its prompts times n samples), left-padded, decoded step by step with
the model's KV cache, exactly the forward passes ``model.generate`` makes; doing the loop here
gives per-row RNGs (a seeded request samples the same whatever shares its batch), log-probs of
the sampled tokens under ``logits / T`` before filtering, per-row stop strings and token-by-token
streaming. The model's generation config (repetition penalty and the like) is not applied:
requests say how to sample.

Every batch and every weight swap runs on the process's one compute thread, so a request sees
one set of weights from its first token to its last, and reports that version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from alignd_server.common.batching import COMPUTE
from alignd_server.common.info import eos_token_ids
from alignd_server.common.models import LoadedModel
from alignd_server.generation.sampling import Sampling, choose, row_generator
from alignd_server.generation.weights import named_parameters

EOS, STOP, LENGTH = "eos", "stop", "length"

#: Called from the compute thread after each step with (row, token, logprob).
StepCallback = Callable[[int, int, float], None]


@dataclass
class Row:
    """One sample being generated."""

    prompt: int  # index of its prompt in the request
    sample: int  # 0 .. n-1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None  # set when a stop string cut it


@dataclass(frozen=True)
class Output:
    """A finished completion."""

    token_ids: np.ndarray  # (T,) int32
    logprobs: np.ndarray  # (T,) float32
    text: str
    finish_reason: str  # eos | stop | length


class HFEngine:
    """Generation with transformers models, one request per batch."""

    name = "hf"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = 0
        self.eos_ids = frozenset(eos_token_ids(loaded))
        self._pad_id = loaded.tokenizer.pad_token_id

    async def generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_step: StepCallback | None = None
    ) -> tuple[list[list[Output]], int]:
        """n completions per prompt, and the weights version that produced them."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(COMPUTE, self._generate, prompts, sampling, on_step)

    def _generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_step: StepCallback | None
    ) -> tuple[list[list[Output]], int]:
        rows = [Row(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        device = self.loaded.device
        generators = [row_generator(sampling.seed, r.prompt, r.sample, device) for r in rows]
        ids, mask = self._left_pad([prompts[r.prompt] for r in rows])  # (B, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P), as model.generate does
        stops = set(sampling.stop_token_ids)
        past = None
        with torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True, logits_to_keep=1,
                )  # fmt: skip
                past = out.past_key_values
                tokens, logprobs = choose(out.logits[:, -1].float(), sampling, generators)
                step = zip(rows, tokens.tolist(), logprobs.tolist(), strict=True)
                for b, (row, token, logprob) in enumerate(step):
                    if row.finish is None:
                        self._append(row, token, logprob, sampling, stops)
                        if on_step is not None:
                            on_step(b, token, logprob)
                if all(r.finish is not None for r in rows):
                    break
                ids = tokens[:, None]  # (B, 1)
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
                positions = positions[:, -1:] + 1
        version = self.version
        return self._outputs(rows, len(prompts), sampling), version

    def _append(self, row: Row, token: int, logprob: float, sampling: Sampling, stops) -> None:
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_ids and not sampling.ignore_eos:
            row.finish = EOS
        elif token in stops or (sampling.stop and self._hit_stop_string(row, sampling)):
            row.finish = STOP
        elif len(row.tokens) >= sampling.max_new_tokens:
            row.finish = LENGTH

    def _hit_stop_string(self, row: Row, sampling: Sampling) -> bool:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=sampling.skip_special_tokens)
        cut = min((i for s in sampling.stop if (i := text.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        row.text = text[:cut]
        return True

    def _outputs(self, rows: list[Row], count: int, sampling: Sampling) -> list[list[Output]]:
        results: list[list[Output]] = [[] for _ in range(count)]
        for row in rows:
            if row.text is None:
                row.text = self.tokenizer.decode(
                    row.tokens, skip_special_tokens=sampling.skip_special_tokens
                )
            results[row.prompt].append(
                Output(
                    np.asarray(row.tokens, dtype=np.int32),
                    np.asarray(row.logprobs, dtype=np.float32),
                    row.text,
                    row.finish or LENGTH,
                )
            )
        return results

    def _left_pad(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) left-padded ids and attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.tensor(np.asarray(row), dtype=torch.long)
            mask[b, width - len(row) :] = 1
        return ids.to(self.loaded.device), mask.to(self.loaded.device)

    # -- weights -------------------------------------------------------------------------

    async def swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Copies ``tensors`` into the named parameters and sets ``version``, between batches."""
        await asyncio.get_running_loop().run_in_executor(COMPUTE, self._swap, tensors, version)

    def _swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        # The names the update was checked against: a tied weight answers to each of its names.
        params = named_parameters(self.model)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(dtype=params[name].dtype))
        self.version = version
