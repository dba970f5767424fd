"""The asyncio clients give the same answers as the sync ones."""

from __future__ import annotations

import asyncio

import numpy as np

from alignd import (
    AsyncReferenceClient,
    AsyncRewardClient,
    AsyncTrainerClient,
    ReferenceClient,
    RewardClient,
    TrainBatch,
    TrainerClient,
    losses,
)


def test_async_reward_client_matches_the_sync_client(serve):
    server = serve("reward", max_batch_size=2)
    prompts, a, b = ["p1", "p2", "p3"], ["good", "fine", "ok"], ["bad", "worse", "no"]
    with RewardClient(server.target) as client:
        scores, probabilities = client.score(prompts, a), client.compare(prompts, a, b)

    async def main():
        async with AsyncRewardClient(server.target) as client:
            return await client.score(prompts, a), await client.compare(prompts, a, b)

    got_scores, got_probabilities = asyncio.run(main())
    np.testing.assert_allclose(got_scores, scores, atol=1e-6)
    np.testing.assert_allclose(got_probabilities, probabilities, atol=1e-6)
    assert got_scores.dtype == np.float32 and got_scores.shape == (3,)


def test_async_reference_client_matches_the_sync_client(serve):
    server = serve("reference", max_batch_size=2)
    rows, prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], [2, 1, 3]
    with ReferenceClient(server.target) as client:
        expected = client.logprobs(rows, prompts)

    async def main():
        async with AsyncReferenceClient(server.target) as client:
            return await client.logprobs(rows, prompts)

    for got, want in zip(asyncio.run(main()), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_async_trainer_client_runs_the_same_steps_as_the_sync_client(serve, tiny_models, tmp_path):
    batch = TrainBatch([[5, 6, 7, 8], [9, 10, 11]], [2, 1])

    def sync_run():
        with TrainerClient(serve("trainer").target) as client:
            client.initialize(tiny_models.causal_lm, lr=1e-2, seed=4)
            losses_ = [client.forward_backward(batch, losses.CrossEntropy()).loss]
            client.optim_step()
            losses_.append(client.forward_backward(batch, losses.CrossEntropy()).loss)
            return losses_, client.forward(batch, ["logprobs"])["logprobs"]

    async def async_run():
        async with AsyncTrainerClient(serve("trainer").target) as client:
            await client.initialize(tiny_models.causal_lm, lr=1e-2, seed=4)
            losses_ = [(await client.forward_backward(batch, losses.CrossEntropy())).loss]
            step = await client.optim_step()
            losses_.append((await client.forward_backward(batch, losses.CrossEntropy())).loss)
            assert step.step == 1 and (await client.state()).accumulated_batches == 1
            saved = await client.save_checkpoint(tmp_path / "ckpt")
            assert (await client.load_checkpoint(saved.path)).step == 1
            return losses_, (await client.forward(batch, ["logprobs"]))["logprobs"]

    expected_losses, expected_logprobs = sync_run()
    got_losses, got_logprobs = asyncio.run(async_run())
    np.testing.assert_allclose(got_losses, expected_losses, atol=1e-7)
    for got, want in zip(got_logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)
