"""Every job kind runs end to end on real services with tiny models, writes its run
directory, and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from alignd import GenerationClient, Platform, RewardClient
from alignd.data import load_examples
from alignd.jobs import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RewardModelConfig,
    RunDirectoryError,
    SFTConfig,
    make_job,
)
from alignd.tasks.sentiment import SCORER, load_task

TASK = load_task()


@pytest.fixture
def platform(serve, tiny_models):
    generation = serve("generation")
    servers = {
        "generation": generation,
        "reward": serve("reward", scorers=[f"oracle={SCORER}"]),
        "reference": serve("reference"),
        "trainer": serve("trainer", push_targets=[generation.target]),
    }
    with Platform(**{role: s.target for role, s in servers.items()}) as platform:
        yield platform


def common(tmp_path, name, **extra):
    return dict(run_dir=tmp_path / name, max_length=160, batch_size=4, micro_batch_size=2,
                optim={"lr": 1e-3}, **extra)  # fmt: skip


def run(config, platform, **options):
    return make_job(config, platform, progress=False, **options).run_to_end()


def test_sft_job_learns_and_writes_its_run_directory(platform, tiny_models, tmp_path):
    config = SFTConfig(data={"path": TASK.sft, "limit": 40, "held_out": 8}, max_steps=6,
                       eval_every=3, save_every=3, **common(tmp_path, "sft"))  # fmt: skip
    rows = run(config, platform)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["eval/loss"] < rows[2]["eval/loss"]
    assert {"loss", "grad_norm", "lr", "tokens", "time/training"} <= rows[0].keys()
    run_dir = tmp_path / "sft"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "events").iterdir())
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    state = json.loads((run_dir / "state.json").read_text())
    assert state["step"] == 6 and state["done"] and (run_dir / "checkpoints" / "final").is_dir()
    with pytest.raises(RunDirectoryError, match="--resume"):
        make_job(config, platform, progress=False)


def test_a_resumed_sft_job_repeats_the_steps_it_lost(platform, tmp_path):
    data = {"path": TASK.sft, "limit": 40, "held_out": 8}
    straight = run(SFTConfig(data=data, max_steps=4, **common(tmp_path, "a")), platform)
    config = SFTConfig(data=data, max_steps=4, save_every=2, **common(tmp_path, "b"))
    job = make_job(config, platform, progress=False)
    for row in job.run():
        if row["step"] == 3:  # interrupted after step 3: the checkpoint of step 2 stands
            break
    resumed = run(config, platform, resume=True)
    assert [r["step"] for r in resumed] == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in resumed],
                               [r["loss"] for r in straight[2:]], rtol=1e-5)  # fmt: skip
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_reward_model_job_reports_held_out_accuracy(platform, serve, tiny_models, tmp_path):
    config = RewardModelConfig(
        model=str(tiny_models.classifier), data={"path": TASK.preferences_train, "limit": 48,
        "eval_path": TASK.preferences_eval}, max_steps=8, **common(tmp_path, "rm"),
    )  # fmt: skip
    rows = run(config, platform)
    assert {"accuracy", "margin", "loss"} <= rows[-1].keys()
    final = tmp_path / "rm" / "checkpoints" / "final"
    # The reported accuracy and margin are what the saved model gives the held-out pairs when
    # the reward service serves it: P(chosen > rejected) > 0.5 counts as right.
    # The trainer's checkpoint says which format the model was trained in, and the reward
    # service reads items that way (not by the default for an encoder, ``pair``).
    assert json.loads((final / "alignd_reward.json").read_text()) == {"format": "alignd"}
    pairs = load_examples(TASK.preferences_eval, "preference")
    with RewardClient(serve("reward", model=str(final)).target) as reward:
        assert reward.info().scorers[0].format == "alignd"
        chosen = reward.score([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = reward.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    margin = chosen.astype(np.float64) - rejected
    assert rows[-1]["eval/accuracy"] == pytest.approx(float((margin > 0).mean()))
    assert rows[-1]["eval/margin"] == pytest.approx(float(margin.mean()), abs=1e-5)


def test_dpo_job_caches_reference_logprobs(platform, tmp_path):
    data = {"path": TASK.preferences_train, "limit": 24, "held_out": 8}
    config = DPOConfig(data=data, max_steps=3, beta=0.5, **common(tmp_path, "dpo"))
    rows = run(config, platform)
    assert {"accuracy", "margin", "rewards_chosen", "eval/accuracy"} <= rows[-1].keys()
    assert rows[0]["time/reference"] > 0
    cached = sorted((tmp_path / "dpo" / "cache").glob("ref_logps-*.npy"))
    # held-out: 8 pairs, train: 16 pairs; two sequences a pair
    assert [np.load(path).shape for path in cached] == [(16,), (32,)]


def test_a_packed_dpo_job_logs_what_the_padded_one_logs(platform, tmp_path):
    """``optim.packing``: the trainer packs every micro-batch, and the job's losses, grad
    norms and held-out metrics are those of the padded run."""
    data = {"path": TASK.preferences_train, "limit": 24, "held_out": 8}
    runs = {}
    for packing in (False, True):
        optim = {"lr": 1e-3, "packing": packing}
        config = DPOConfig(data=data, max_steps=2, beta=0.5,
                           **{**common(tmp_path, f"dpo-{packing}"), "optim": optim})  # fmt: skip
        runs[packing] = run(config, platform)
        assert platform.trainer.info().packing is packing
    for packed, padded in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "grad_norm", "accuracy", "margin", "eval/accuracy", "eval/loss"):
            if key in padded:
                assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), key
    with pytest.raises(ValidationError, match="packing_max_tokens needs packing: true"):
        DPOConfig(data=data, **{**common(tmp_path, "no"), "optim": {"packing_max_tokens": 64}})


def test_ppo_job_rounds_push_weights_to_generation(platform, tmp_path):
    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
        rollout={"prompts_per_round": 4, "max_new_tokens": 8, "scorer": "oracle"},
        missing_eos_penalty=1.0, adaptive_kl=True, **common(tmp_path, "ppo"),
    )  # fmt: skip
    rows = run(config, platform)
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward", "kl", "kl_coef", "clip_fraction", "value_loss", "time/generation",
            "time/scoring", "time/reference", "time/weight_sync"} <= rows[-1].keys()  # fmt: skip
    assert platform.generation.info().weights_version == 3  # v1 before round 1, then 2, 3
    job = make_job(config.model_copy(update={"run_dir": tmp_path / "ppo2"}), platform)
    assert job.optimizer_steps() == 2 * 2 * 1  # rounds × ppo_epochs × minibatches of 4 rows
    assert platform.trainer.state().step == job.optimizer_steps()
    # Adaptive KL (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after
    # each round of n = 4 samples, from β = 0.05, target 6, horizon 10000.
    beta = 0.05
    for row in rows:
        assert row["kl_coef"] == pytest.approx(beta, rel=1e-12)
        beta *= 1 + float(np.clip(row["kl"] / 6.0 - 1, -0.2, 0.2)) * 4 / 10000
    state = json.loads((tmp_path / "ppo" / "state.json").read_text())
    assert state["kl_coef"] == pytest.approx(beta, rel=1e-12) and beta != 0.05


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_grpo_and_rloo_jobs_use_group_baselines(platform, tmp_path, baseline, monkeypatch):
    from alignd.jobs.online import GRPOJob

    seen = []  # (rollout scores, the advantages the loss got) of each round
    original = GRPOJob._train

    def recording(self, step, rollout, loss, epochs, **inputs):
        seen.append((rollout.scores.copy(), inputs["advantages"][:, 0].copy(), inputs))
        return original(self, step, rollout, loss, epochs, **inputs)

    monkeypatch.setattr(GRPOJob, "_train", recording)
    config = GRPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=1,
        rollout={"prompts_per_round": 2, "max_new_tokens": 8, "scorer": "oracle"},
        group_size=4, baseline=baseline, kl_coef=0.05, **common(tmp_path, baseline),
    )  # fmt: skip
    rows = run(config, platform)
    ((scores, advantages, inputs),) = seen
    groups = scores.reshape(2, 4)  # 2 prompts x 4 samples, consecutive
    if baseline == "grpo":  # (r - mean) / (std + 1e-4), std Bessel-corrected, per group
        expected = (groups - groups.mean(1, keepdims=True)) / (
            groups.std(1, ddof=1, keepdims=True) + 1e-4
        )
    else:  # r_i - mean of the other three
        expected = groups - (groups.sum(1, keepdims=True) - groups) / 3
    np.testing.assert_allclose(advantages, expected.reshape(-1), rtol=1e-6, atol=1e-9)
    assert {"old_logprobs", "ref_logprobs"} <= inputs.keys()  # clipping on, kl_coef > 0
    assert rows[0]["reward"] == pytest.approx(scores.mean())
    assert rows[0]["kl"] >= 0  # k3 is never negative


def test_online_rounds_are_capped_by_max_steps_and_evaluated_on_held_out_prompts(
    platform, tmp_path
):
    from alignd.evaluation import evaluate_policy

    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=3, max_steps=2,
        eval_every=1, eval_samples=2, rollout={"prompts_per_round": 4, "max_new_tokens": 6,
        "scorer": "oracle"}, **common(tmp_path, "ppo-eval"),
    )  # fmt: skip
    job = make_job(config, platform, progress=False)
    rows = job.run_to_end()
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"eval/reward", "eval/reward_se", "eval/kl", "eval/kl_se", "eval/length",
                "eval/length_se"} <= row.keys()  # fmt: skip
    # The last evaluation is what the final policy (still serving) gives on the held-out
    # prompts with the same seed.
    held = [p.prompt for p in job.held]
    report = evaluate_policy(
        "ppo", platform.generation, platform.reward, platform.reference, held, samples=2,
        max_new_tokens=6, seed=job.eval_seed(2), scorer="oracle",
    )  # fmt: skip
    assert report.reward.n == 2 * len(held) == 8
    assert rows[-1]["eval/reward"] == pytest.approx(report.reward.mean, abs=1e-6)
    assert rows[-1]["eval/length"] == report.length.mean
    assert rows[-1]["eval/kl"] == pytest.approx(report.kl.mean, abs=1e-4)


def test_online_configs_refuse_epochs():
    from alignd.jobs import ConfigError, parse_job_config

    document = {"kind": "grpo", "data": {"path": "p.jsonl"}, "epochs": 2}
    with pytest.raises(ConfigError, match="epochs does not apply to online jobs"):
        parse_job_config(document)


def test_trainer_calls_get_the_jobs_deadline_not_the_platforms(serve, tmp_path, monkeypatch):
    from alignd_server.trainer.servicer import TrainerServicer

    remaining: list[float] = []  # each ForwardBackward's deadline as the server sees it
    original = TrainerServicer.ForwardBackward

    async def recording(self, request, context):
        remaining.append(context.time_remaining())
        return await original(self, request, context)

    monkeypatch.setattr(TrainerServicer, "ForwardBackward", recording)
    trainer = serve("trainer")
    data = {"path": TASK.sft, "limit": 16, "held_out": 4}
    config = SFTConfig(data=data, max_steps=1, trainer_timeout_s=1234, **common(tmp_path, "t"))
    with Platform(trainer=trainer.target, timeout=5) as platform:  # a short platform default
        run(config, platform)
    # gRPC carries deadlines rounded up to the next unit: about 1234 s, far above 5 s.
    assert remaining and all(1200 < r < 1300 for r in remaining), remaining


def test_a_failed_job_says_what_failed_and_the_command_that_resumes_it(
    serve, tmp_path, monkeypatch, capsys
):
    import shlex

    import yaml

    from alignd.cli import main
    from alignd_server.common.errors import Unavailable
    from alignd_server.trainer.servicer import TrainerServicer

    calls, failing = [], [True]
    original = TrainerServicer.ForwardBackward

    async def third_call_fails(self, request, context):
        calls.append(1)
        if failing[0] and len(calls) == 3:  # step 3's (one ForwardBackward a step)
            raise Unavailable("the trainer is restarting")
        return await original(self, request, context)

    monkeypatch.setattr(TrainerServicer, "ForwardBackward", third_call_fails)
    trainer = serve("trainer")
    job = tmp_path / "sft.yaml"
    job.write_text(yaml.safe_dump({
        "kind": "sft", "run_dir": str(tmp_path / "run"), "data": {"path": str(TASK.sft),
        "limit": 16, "held_out": 4}, "max_length": 160, "batch_size": 4, "max_steps": 3,
        "save_every": 1, "retry_seconds": 300, "optim": {"lr": 1e-3},
    }))  # fmt: skip
    where = tmp_path / "platform.yaml"
    where.write_text(yaml.safe_dump({"services": {"trainer": trainer.target}}))
    assert main(["run", str(job), "--platform", str(where)]) == 1
    assert len(calls) == 3  # a ForwardBackward is never retried: it would count twice
    line = capsys.readouterr().err.strip().splitlines()[-1]
    command = f"alignd run {job} --resume --platform {where}"
    assert line.startswith("alignd run: sft failed at step 3 of 3: ")
    assert "UNAVAILABLE: the trainer is restarting" in line
    assert "a resumed run starts at step 3" in line  # step 2 was saved
    assert line.endswith(f"; continue with: {command}")
    failing[0] = False
    assert main(shlex.split(command)[1:]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert len(calls) == 4  # the resumed run repeated step 3 only


def test_every_job_config_field_is_documented_and_printed_by_help_config(capsys):
    from pydantic import BaseModel

    from alignd.cli import main
    from alignd.jobs.config import CONFIGS

    def fields(cls, prefix=""):
        for name, field in cls.model_fields.items():
            yield f"{prefix}{name}", field
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    yield from fields(arg, f"{prefix}{name}.")

    for kind, cls in CONFIGS.items():
        undocumented = [name for name, field in fields(cls) if not field.description]
        assert not undocumented, (kind, undocumented)
        assert main(["run", "--help-config", kind]) == 0
        printed = capsys.readouterr().out
        for name, field in fields(cls):
            assert f"\n{name} (" in printed, (kind, name)
            assert " ".join(field.description.split())[:40] in printed
    assert main(["run", "--help-config", "kto"]) == 2
    assert "unknown job kind 'kto'" in capsys.readouterr().err


def test_ppo_follows_generation_replicas_found_by_dns_when_one_is_replaced(serve, tmp_path):
    first = serve("generation")
    port = int(first.target.rsplit(":", 1)[1])
    replicas = {"127.0.0.1": first}
    for host in ("127.0.0.2", "127.0.0.3"):  # the same port on other loopback addresses
        replicas[host] = serve("generation", host=host, port=port)
    records = {"gen-headless.ml.svc": ["127.0.0.1", "127.0.0.2"]}
    lookups = []

    def resolver(host, port_):
        lookups.append(host)
        return list(records[host])

    allowed = [f"{host}:{port}" for host in replicas]
    others = {
        "reward": serve("reward", scorers=[f"oracle={SCORER}"]).target,
        "reference": serve("reference").target,
        "trainer": serve("trainer", push_targets=allowed).target,
    }
    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=3,
        rollout={"prompts_per_round": 4, "max_new_tokens": 6, "scorer": "oracle"},
        retry_seconds=60, **common(tmp_path, "ppo-dns"),
    )  # fmt: skip
    platform = Platform(generation_dns=f"gen-headless.ml.svc:{port}", resolver=resolver, **others)
    with platform:
        steps = []
        for row in make_job(config, platform, progress=False).run():
            steps.append(row["step"])
            if row["step"] == 1:  # the pod at .2 is replaced by one at .3
                replicas["127.0.0.2"].stop()
                records["gen-headless.ml.svc"] = ["127.0.0.1", "127.0.0.3"]
        assert steps == [1, 2, 3]
        assert platform.generation_targets == [f"127.0.0.1:{port}", f"127.0.0.3:{port}"]
    for host in ("127.0.0.1", "127.0.0.3"):
        with GenerationClient(f"{host}:{port}") as client:
            assert client.info().weights_version == 4, host  # v1 before round 1, then 2, 3, 4
    assert len(lookups) >= 2  # looked up again when the replica failed


def test_a_deterministic_job_repeats_bit_for_bit_while_others_load_the_services(serve, tmp_path):
    import random
    import threading

    from alignd import ReferenceClient

    # Batches wait 100 ms to fill, so other callers' items would share the job's batches (and
    # change their last bits: padding changes the matmul shapes) but for the isolation.
    generation = serve("generation")
    platform = Platform(
        generation=generation.target, reward=serve("reward", max_wait_ms=100).target,
        reference=serve("reference", max_wait_ms=100).target,
        trainer=serve("trainer", push_targets=[generation.target]).target,
    )  # fmt: skip

    def config(name):  # the reward model scores (a model: its batches decide its last bits)
        return PPOConfig(
            data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
            rollout={"prompts_per_round": 4, "max_new_tokens": 6}, eval_every=1,
            deterministic=True, **common(tmp_path, name),
        )  # fmt: skip

    def numbers(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]

    quiet = run(config("quiet"), platform)
    stop, sent = threading.Event(), []

    def load():  # other callers: items of every length, all the time
        rng = random.Random(0)
        with (
            RewardClient(platform.targets["reward"][0]) as reward,
            ReferenceClient(platform.targets["reference"][0]) as reference,
        ):
            while not stop.is_set():
                n = rng.randint(1, 5)
                reward.score(
                    ["a prompt " * rng.randint(1, 9)] * n, ["yes " * rng.randint(1, 20)] * n
                )
                rows = [list(range(5, 5 + rng.randint(3, 40))) for _ in range(n)]
                reference.logprobs(rows, [2] * n)
                sent.append(n)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        loaded = run(config("loaded"), platform)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    platform.close()
    assert len(sent) > 10  # the services were busy with others throughout
    assert numbers(loaded) == numbers(quiet)


def test_split_shares_balances_requested_tokens_and_keeps_each_shares_order():
    from alignd import SamplingParams
    from alignd.jobs.online import split_shares

    params = SamplingParams(max_new_tokens=10, n=2)
    prompts = ["x" * 400, "y" * 40, "z" * 40, "w" * 40, "v" * 40]  # costs 2 x (100 | 10 + 10)
    assert split_shares(prompts, 2, params) == [[0], [1, 2, 3, 4]]  # 220 vs 4 x 40
    assert split_shares(prompts, 1, params) == [[0, 1, 2, 3, 4]]
    assert split_shares(prompts[:2], 4, params) == [[0], [1]]  # no empty shares


def _two_replicas(serve, records):
    first = serve("generation")
    port = int(first.target.rsplit(":", 1)[1])
    second = serve("generation", host="127.0.0.2", port=port)
    records["gen-headless.ml.svc"] = ["127.0.0.1", "127.0.0.2"]
    others = {
        "reward": serve("reward", scorers=[f"oracle={SCORER}"]).target,
        "reference": serve("reference").target,
        "trainer": serve("trainer", push_targets=[first.target, f"127.0.0.2:{port}"]).target,
    }
    platform = Platform(generation_dns=f"gen-headless.ml.svc:{port}",
                        resolver=lambda host, _: list(records[host]), **others)  # fmt: skip
    return first, second, platform


def test_online_rounds_sample_from_every_replica(serve, tmp_path):
    from service_metrics import scrape

    first, second, platform = _two_replicas(serve, {})
    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
        rollout={"prompts_per_round": 6, "max_new_tokens": 6, "scorer": "oracle"},
        **common(tmp_path, "ppo-replicas"),
    )  # fmt: skip
    with platform:
        rows = list(make_job(config, platform, progress=False).run())
    for row in rows:
        assert row["generation/replica0/tokens"] > 0 and row["generation/replica1/tokens"] > 0
        assert row["time/generation/replica0"] > 0 and row["time/generation/replica1"] > 0
    for index, server in enumerate((first, second)):
        served = scrape(server)[("alignd_generated_tokens_total", frozenset())]
        logged = sum(row[f"generation/replica{index}/tokens"] for row in rows)
        assert served >= logged  # the held-out evaluation samples from the first replica too


def test_rounds_can_push_their_weights_over_the_collective_transport(serve, tmp_path):
    """``weight_sync: {transport: collective}``: every round's weights reach both replicas by
    ReceiveWeights (not UpdateWeights), and the rounds compute what rounds pushed over the
    gRPC stream compute (deterministic mode: the same bits)."""
    from service_metrics import request_codes

    first, second, platform = _two_replicas(serve, {})

    def config(name, **sync):
        return GRPOConfig(
            data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
            rollout={"prompts_per_round": 2, "max_new_tokens": 6, "scorer": "oracle"},
            group_size=2, deterministic=True, weight_sync=sync, **common(tmp_path, name),
        )  # fmt: skip

    def numbers(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]

    with platform:
        stream = run(config("stream"), platform)
        before = [request_codes(s, "UpdateWeights").get("OK", 0) for s in (first, second)]
        collective = run(config("collective", transport="collective",
                                rendezvous="127.0.0.1:0"), platform)  # fmt: skip
    assert numbers(collective) == numbers(stream)
    for server, updates in zip((first, second), before, strict=True):
        assert request_codes(server, "ReceiveWeights").get("OK", 0) == 3  # v1, then 2 rounds
        assert request_codes(server, "UpdateWeights").get("OK", 0) == updates
    with pytest.raises(ValidationError, match="rendezvous goes with transport: collective"):
        config("refused", rendezvous="127.0.0.1:0")
    with pytest.raises(ValidationError, match="bucket_bytes applies to transport: collective"):
        config("refused", transport="shared_path", shared_path="/x", bucket_bytes=1024)


def test_a_replica_that_fails_mid_round_has_its_share_sent_to_the_other(
    serve, tmp_path, monkeypatch
):
    from alignd_server.common.errors import Unavailable
    from alignd_server.generation.servicer import GenerationServicer

    records: dict[str, list[str]] = {}
    dying, calls = [], []
    original = GenerationServicer.Generate

    async def generate(self, request, context):
        if self in dying:
            calls.append(1)
            if len(calls) >= 2:  # round 2: the pod goes away while the round runs
                records["gen-headless.ml.svc"] = ["127.0.0.1"]
                raise Unavailable("the replica is going away")
        return await original(self, request, context)

    monkeypatch.setattr(GenerationServicer, "Generate", generate)  # before the servers start
    first, second, platform = _two_replicas(serve, records)
    dying.append(second.server.services[0])
    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=3,
        rollout={"prompts_per_round": 6, "max_new_tokens": 6, "scorer": "oracle"},
        retry_seconds=60, **common(tmp_path, "ppo-replica-dies"),
    )  # fmt: skip
    with platform:
        rows = list(make_job(config, platform, progress=False).run())
        assert platform.generation_targets == [first.target]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0]["generation/replica1/tokens"] > 0  # both served round 1
    # Round 2's share failed there (the client's own retries included), then went to the first.
    assert len(calls) >= 2
    assert (
        "generation/replica1/tokens" not in rows[1] and "generation/replica1/tokens" not in rows[2]
    )
    # The first replica served the whole of rounds 2 and 3: 6 prompts x the group each.
    assert rows[1]["generation/replica0/tokens"] >= 6


def _services(serve, scorer: str):
    """The trainer's server and the four services' targets (reward with ``scorer``)."""
    generation = serve("generation")
    trainer = serve("trainer", push_targets=[generation.target])
    return trainer, {
        "generation": generation.target, "trainer": trainer.target,
        "reward": serve("reward", scorers=[scorer]).target, "reference": serve("reference").target,
    }  # fmt: skip


def _forward_calls(trainer) -> float:
    from service_metrics import request_codes

    return request_codes(trainer, "Forward").get("OK", 0.0)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_old_logprobs_from_the_generator_give_the_same_losses_with_fewer_forwards(
    serve, tmp_path, kind
):
    """On one on-policy pass the generator's log-probs stand in for a trainer Forward: the
    losses agree (the CPU engines' log-probs agree to 1e-4); GRPO saves one Forward a round
    (PPO's Forward computes the values anyway)."""
    trainer, services = _services(serve, f"oracle={SCORER}")
    runs, forwards = {}, {}
    for recompute in (True, False):
        options = dict(
            data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
            rollout={"prompts_per_round": 2, "max_new_tokens": 8, "scorer": "oracle"},
            recompute_old_logprobs=recompute,
            **{**common(tmp_path, f"{kind}-{recompute}"), "batch_size": 8},  # one pass
        )  # fmt: skip
        if kind == "grpo":
            config = GRPOConfig(group_size=4, clip_range=0.2, **options)
        else:
            config = PPOConfig(ppo_epochs=1, **options)
        before = _forward_calls(trainer)
        with Platform(**services) as platform:
            runs[recompute] = run(config, platform)
        forwards[recompute] = _forward_calls(trainer) - before
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["reward"] == b["reward"]  # the same samples
        assert a["logprob_mismatch/mean_abs"] < 1e-4 and a["logprob_mismatch/max"] < 1e-3
        assert "logprob_mismatch/mean_abs" not in b
    saved = 2 if kind == "grpo" else 0
    assert forwards[True] - forwards[False] == saved


def test_overlapped_rounds_take_less_than_their_phases_and_match_the_serial_round(serve, tmp_path):
    from function_scorers import SLOW

    trainer, services = _services(serve, f"slow={SLOW}")
    runs, forwards = {}, {}
    for overlap in (True, False):
        before = _forward_calls(trainer)
        config = PPOConfig(
            data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=2,
            rollout={"prompts_per_round": 8, "max_new_tokens": 8, "scorer": "slow",
                     "chunk_prompts": 2, "overlap": overlap},
            deterministic=True, **common(tmp_path, f"overlap-{overlap}"),
        )  # fmt: skip
        with Platform(**services) as platform:
            runs[overlap] = run(config, platform)
        forwards[overlap] = _forward_calls(trainer) - before
    # Each chunk's old log-probs and values came from its own Forward, as soon as it was scored.
    assert forwards == {True: 8, False: 8}  # 4 chunks x 2 rounds, no Forward of the whole
    for overlapped, rows in runs.items():
        for row in rows:
            phases = row["time/generation_wall"] + row["time/scoring"] + row["time/reference"]
            if overlapped:  # chunks were scored while others generated
                assert phases > row["time/rollout"]
            else:  # one phase after another
                assert phases <= row["time/rollout"]
    for a, b in zip(runs[True], runs[False], strict=True):
        same = {k: v for k, v in a.items() if k != "time" and not k.startswith("time/")}
        assert same == {k: v for k, v in b.items() if k != "time" and not k.startswith("time/")}


def test_overlap_without_chunks_is_refused_by_name():
    from alignd.jobs.config import RolloutConfig

    with pytest.raises(ValueError, match="overlap applies to chunked rounds only"):
        RolloutConfig(overlap=False)
    assert RolloutConfig(chunk_prompts=2, overlap=False).overlap is False


def _off_policy(kind: str, tmp_path, name: str, **extra):
    options = dict(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=4,
        rollout={"prompts_per_round": 2, "max_new_tokens": 8, "scorer": "length"},
        deterministic=True, **{**common(tmp_path, name), "optim": {"lr": 1e-2},
                               "batch_size": 8, "micro_batch_size": 4, **extra},
    )  # fmt: skip
    if kind == "grpo":  # 8 rows a round: one optimizer step of two ForwardBackward calls
        return GRPOConfig(group_size=4, **options)
    return PPOConfig(ppo_epochs=1, **options)


def _versions_pushed(trainer) -> float:
    from service_metrics import request_codes

    return request_codes(trainer, "PushWeights").get("OK", 0.0)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_off_policy_rounds_train_on_samples_of_the_previous_weights_with_importance_weights(
    serve, tmp_path, kind
):
    from function_scorers import BY_LENGTH

    trainer, services = _services(serve, f"length={BY_LENGTH}")
    before = _versions_pushed(trainer)
    with GenerationClient(services["generation"]) as generation:
        first = generation.info().weights_version
        with Platform(**services) as platform:
            rows = run(_off_policy(kind, tmp_path, f"{kind}-off", off_policy_steps=1), platform)
        served = generation.info().weights_version
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # Round 1 samples the first weights; every later round the weights of the round before.
    assert [row["staleness/mean"] for row in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [row["staleness/max"] for row in rows] == [0.0, 1.0, 1.0, 1.0]
    for row in rows:
        assert 0 < row["is_weight/mean"] <= 2.0 and row["is_weight/max"] <= 2.0
        assert 0 <= row["is_weight/clipped_fraction"] <= 1
    for row in rows[:-1]:  # the next round's generation ran while this one trained
        assert row["time/generation"] > 0
    assert "time/generation" not in rows[-1]  # nothing is left to generate ahead
    # Round 1's behaviour and old policies are the same weights (the engines agree to 1e-4);
    # later rounds' differ by one optimizer step.
    assert rows[0]["logprob_mismatch/max"] < 1e-3
    assert abs(rows[0]["is_weight/mean"] - 1.0) < 1e-3
    assert max(row["logprob_mismatch/max"] for row in rows[1:]) > rows[0]["logprob_mismatch/max"]
    # One push per round, plus the first weights; the last round's is served.
    assert _versions_pushed(trainer) - before == 5
    assert served == first + 5


def test_a_resumed_off_policy_run_trains_on_the_rollouts_it_had_generated_ahead(
    serve, tmp_path, monkeypatch
):
    """The trainer fails in round 3 while round 4's rollout is being generated; the resumed
    run trains round 3 on the rollout saved with round 2's checkpoint (sampled by round 2's
    weights), generates round 4's again, and logs what an uninterrupted run logs."""
    from alignd.jobs import JobFailed
    from alignd_server.common.errors import Unavailable
    from alignd_server.trainer.servicer import TrainerServicer

    calls, failing = [], [False]
    original = TrainerServicer.ForwardBackward

    async def fails_in_round_3(self, request, context):
        if failing[0]:
            calls.append(1)
            if len(calls) == 5:  # two ForwardBackward calls a round
                raise Unavailable("the trainer is restarting")
        return await original(self, request, context)

    from function_scorers import BY_LENGTH

    monkeypatch.setattr(TrainerServicer, "ForwardBackward", fails_in_round_3)  # before serving
    _, services = _services(serve, f"length={BY_LENGTH}")
    with Platform(**services) as platform:
        whole = run(_off_policy("grpo", tmp_path, "whole", off_policy_steps=1), platform)
        failing[0] = True
        config = _off_policy("grpo", tmp_path, "resumed", off_policy_steps=1, save_every=1)
        with pytest.raises(JobFailed, match="at step 3 of 4"):
            run(config, platform)
        state = json.loads((config.run_dir / "state.json").read_text())
        assert state["step"] == 2 and state["ahead"] == {"3": "step-3.npz"}
        assert sorted(p.name for p in (config.run_dir / "rollouts").iterdir()) == ["step-3.npz"]
        failing[0] = False
        resumed = run(config, platform, resume=True)
    assert [row["step"] for row in resumed] == [3, 4]
    logged = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").open()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]  # every round once

    def same(row):
        return {k: v for k, v in row.items() if k != "time" and not k.startswith("time/")}

    assert [same(row) for row in logged] == [same(row) for row in whole]
    assert not list((config.run_dir / "rollouts").iterdir())  # none needed any more


def test_a_rollout_generated_ahead_is_written_and_read_back_array_for_array(tmp_path):
    from alignd.jobs.online import Rollout

    rollout = Rollout(
        ["text prompt", [{"role": "user", "content": "Hi"}]],
        [np.array([1, 2, 3, 4]), np.array([5, 6, 7])], [2, 1], ["a", "bé"],
        np.array([0.5, -1.25]), np.array([True, False]),
        np.array([[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]], np.float32),
        np.array([[1, 1, 0], [1, 1, 1]], np.float32),
        np.array([[-0.11, -0.21, 0.0], [-0.31, -0.41, -0.51]], np.float32),
        np.array([7, 7]),
    )  # fmt: skip
    rollout.save(tmp_path / "step-3.npz")
    back = Rollout.load(tmp_path / "step-3.npz")
    assert back.prompts == rollout.prompts and back.texts == rollout.texts
    assert back.prompt_lengths == rollout.prompt_lengths
    for a, b in zip(back.rows, rollout.rows, strict=True):
        assert a.tolist() == b.tolist()
    for name in ("scores", "eos", "ref_logprobs", "mask", "gen_logprobs", "versions"):
        got, want = getattr(back, name), getattr(rollout, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert [p.name for p in tmp_path.iterdir()] == ["step-3.npz"]


def test_off_policy_settings_are_refused_where_they_cannot_apply():
    base = dict(data={"path": TASK.train_prompts}, run_dir="runs/x")
    with pytest.raises(ValueError, match="is_cap applies to off-policy rounds only"):
        GRPOConfig(is_cap=3.0, **base)
    with pytest.raises(ValueError, match="off_policy_steps needs recompute_old_logprobs"):
        PPOConfig(off_policy_steps=1, recompute_old_logprobs=False, **base)
    assert GRPOConfig(off_policy_steps=2, is_cap=3.0, **base).is_cap == 3.0
    with pytest.raises(ValueError, match="off_policy_steps"):
        GRPOConfig(off_policy_steps=9, **base)


def test_gold_and_early_stop_settings_are_checked():
    base = dict(data={"path": TASK.train_prompts}, run_dir="runs/x")
    with pytest.raises(ValueError, match="gold_scorer 'oracle' is the training scorer"):
        GRPOConfig(gold_scorer="oracle", rollout={"scorer": "oracle"}, **base)
    with pytest.raises(ValueError, match="early_stop needs gold_scorer"):
        PPOConfig(early_stop={"patience": 2}, eval_every=1, **base)
    with pytest.raises(ValueError, match="early_stop needs eval_every"):
        PPOConfig(early_stop={}, gold_scorer="oracle", **base)
    with pytest.raises(ValueError, match="patience"):
        PPOConfig(early_stop={"patience": 0}, gold_scorer="oracle", eval_every=1, **base)
    with pytest.raises(ValueError, match="patiance"):
        PPOConfig(early_stop={"patiance": 2}, gold_scorer="oracle", eval_every=1, **base)
    config = GRPOConfig(early_stop={"min_delta": 0.01}, gold_scorer="oracle", eval_every=2, **base)
    assert (config.early_stop.patience, config.early_stop.min_delta) == (3, 0.01)


def test_a_refused_weight_push_fails_the_job_at_once(serve, tmp_path, monkeypatch):
    """Only a replica that is restarting (UNAVAILABLE and the like) is pushed to again; a
    replica that refuses the weights fails the job on the first try, naming the refusal."""
    from alignd.errors import InvalidArgumentError, from_status_text
    from alignd.jobs import JobFailed
    from alignd_server.common.errors import InvalidArgument
    from alignd_server.generation.servicer import GenerationServicer

    pushes = []

    async def refuses(self, request_iterator, context):
        pushes.append(1)
        async for _ in request_iterator:  # the header, as the servicer's own check reads it
            break
        raise InvalidArgument("header.version", "this replica refuses every push")

    monkeypatch.setattr(GenerationServicer, "UpdateWeights", refuses)  # before serving
    _, services = _services(serve, f"oracle={SCORER}")
    config = PPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=1,
        rollout={"prompts_per_round": 2, "max_new_tokens": 4, "scorer": "oracle"},
        retry_seconds=600, **common(tmp_path, "refused"),
    )  # fmt: skip
    with Platform(**services) as platform, pytest.raises(JobFailed) as failed:
        run(config, platform)
    assert isinstance(failed.value.cause, InvalidArgumentError)
    assert "PushWeights: INVALID_ARGUMENT" in str(failed.value)
    assert "refuses every push" in str(failed.value)
    assert len(pushes) == 1
    error = from_status_text("UNAVAILABLE: restarting", "PushWeights")
    assert type(error).__name__ == "UnavailableError" and error.details == "restarting"
    assert from_status_text("not a status").details == "not a status"


@pytest.mark.parametrize("chunk_prompts", [0, 1])
def test_an_ensemble_scorer_trains_a_round_and_logs_its_members_spread(
    serve, tmp_path, chunk_prompts
):
    """``rollout.scorer`` an ensemble of ``length / 10`` and ``length / 5``: the round trains
    on the members' mean (0.15 × length) and logs ``reward/ensemble_std``, the mean over
    samples of their std (0.05 × length): a third of the reward. Serial and chunked rounds,
    and the rollout saved for a resume keeps the spread."""
    from function_scorers import BY_LENGTH, TWICE_LENGTH

    from alignd.jobs.online import Rollout

    generation = serve("generation")
    trainer = serve("trainer", push_targets=[generation.target])
    reward = serve("reward", scorers=[f"tenth={BY_LENGTH}", f"fifth={TWICE_LENGTH}",
                                      "ens=ensemble:tenth,fifth"])  # fmt: skip
    services = {"generation": generation.target, "trainer": trainer.target,
                "reward": reward.target, "reference": serve("reference").target}  # fmt: skip
    config = GRPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 4}, rounds=1,
        rollout={"prompts_per_round": 2, "max_new_tokens": 8, "scorer": "ens",
                 "chunk_prompts": chunk_prompts},
        group_size=4, kl_coef=0.0, **common(tmp_path, f"ens-{chunk_prompts}"),
    )  # fmt: skip
    with Platform(**services) as platform:
        (row,) = run(config, platform)
    assert row["reward"] > 0
    assert row["reward/ensemble_std"] == pytest.approx(row["reward"] / 3, rel=1e-5)
    spread = np.array([0.5, 0.25])
    saved = Rollout(["p", "q"], [np.array([1, 2]), np.array([3])], [1, 1], ["a", "b"],
                    np.zeros(2), np.zeros(2, bool), np.zeros((2, 1)), np.ones((2, 1)),
                    np.zeros((2, 1)), np.zeros(2, np.int64), spread=spread)  # fmt: skip
    saved.save(tmp_path / "rollout.npz")
    np.testing.assert_array_equal(Rollout.load(tmp_path / "rollout.npz").spread, spread)


def _gold_config(tmp_path, name: str, scorer: str = "length", **extra) -> GRPOConfig:
    options = {"rounds": 6, "eval_every": 1, "gold_scorer": "oracle", **extra}
    return GRPOConfig(
        data={"path": TASK.train_prompts, "limit": 20, "held_out": 2},
        rollout={"prompts_per_round": 2, "max_new_tokens": 6, "scorer": scorer},
        group_size=2, kl_coef=0.0, **common(tmp_path, name), **options,
    )  # fmt: skip


def test_the_gold_scorer_scores_the_held_out_completions_beside_the_proxy(serve, tmp_path):
    from function_scorers import BY_LENGTH

    from alignd.evaluation import evaluate_policy

    generation = serve("generation")
    trainer = serve("trainer", push_targets=[generation.target])
    reward = serve("reward", scorers=[f"length={BY_LENGTH}", f"oracle={SCORER}"])
    services = {"generation": generation.target, "trainer": trainer.target,
                "reward": reward.target, "reference": serve("reference").target}  # fmt: skip
    config = _gold_config(tmp_path, "gold", rounds=2, eval_samples=2)
    with Platform(**services) as platform:
        rows = run(config, platform)
        # the same evaluation again, by hand: the proxy and the gold score the same samples
        again = config.model_copy(update={"run_dir": tmp_path / "again"})
        held = make_job(again, platform, progress=False)
        held.setup()
        report = evaluate_policy(
            "again", platform.generation, platform.reward, platform.reference,
            [p.prompt for p in held.held], samples=2, max_new_tokens=6,
            seed=held.eval_seed(2), scorer="length", gold_scorer="oracle",
        )  # fmt: skip
    for row in rows:
        assert {"eval/gold", "eval/gold_se", "eval/reward", "eval/kl"} <= row.keys()
        assert 0.0 <= row["eval/gold"] <= 1.0
    assert rows[-1]["eval/reward"] == pytest.approx(report.reward.mean)
    assert rows[-1]["eval/gold"] == pytest.approx(report.gold.mean)
    state = json.loads((tmp_path / "gold" / "state.json").read_text())
    best = max(rows, key=lambda r: r["eval/gold"])  # the first of equals stays the best
    assert state["gold"]["step"] == min(r["step"] for r in rows
                                        if r["eval/gold"] == best["eval/gold"])  # fmt: skip
    assert (tmp_path / "gold" / "checkpoints" / "best" / "alignd_checkpoint.json").is_file()
    assert (tmp_path / "gold" / "plots" / "overoptimization.png").is_file()


@pytest.mark.parametrize(
    ("proxy", "gold", "stops_at", "best_at"),
    [
        # gold peaks at round 2; the proxy keeps rising: 2 evaluations later, stop
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.5, 0.45, 0.4, 0.3, 0.2], 4, 2),
        # gold stalls but so does the proxy: a plateau, not over-optimisation — no stop
        ([0.1, 0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.4, 0.3, 0.2, 0.1], None, 2),
        # an improvement smaller than min_delta (0.05) does not reset the count
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.5, 0.52, 0.53, 0.3, 0.2], 4, 2),
    ],
)
def test_early_stopping_fires_on_the_gold_and_proxy_curves_and_keeps_the_best(
    platform, tmp_path, monkeypatch, proxy, gold, stops_at, best_at
):
    """Scripted held-out scores (the evaluation's numbers replaced, the rounds real): the run
    stops once the gold has not beaten its best for ``patience`` (2) evaluations while the
    proxy rose past its value at the best; ``checkpoints/best`` holds the best round's
    weights."""
    from alignd import jobs
    from alignd.evaluation import Estimate, PolicyReport

    calls = iter(range(len(proxy)))

    def scripted(*args, **kwargs):
        i = next(calls)
        one = Estimate(0.0, 0.0, 1)
        return PolicyReport("scripted", None, Estimate(proxy[i], 0.0, 1), one, one, [],
                            Estimate(gold[i], 0.0, 1))  # fmt: skip

    monkeypatch.setattr(jobs.online, "evaluate_policy", scripted)
    saved = []
    original = jobs.base.Job.track_gold

    def track(self, step, gold, proxy):
        original(self, step, gold, proxy)
        saved.append((step, self.gold["step"]))

    monkeypatch.setattr(jobs.base.Job, "track_gold", track)
    stop = {"patience": 2, "min_delta": 0.05}
    rows = run(_gold_config(tmp_path, "stop", "default", early_stop=stop), platform)
    assert [r["step"] for r in rows] == list(range(1, (stops_at or 6) + 1))
    assert ("early_stop" in rows[-1]) == (stops_at is not None)
    state = json.loads((tmp_path / "stop" / "state.json").read_text())
    assert state["gold"]["step"] == best_at and state["done"]
    marker = tmp_path / "stop" / "checkpoints" / "best" / "alignd_checkpoint.json"
    assert json.loads(marker.read_text())["step"] == best_at  # the trainer's steps: 1 a round
    assert (tmp_path / "stop" / "checkpoints" / "final").is_dir()
    assert saved[-1] == (rows[-1]["step"], best_at)


def test_a_gold_scorer_the_job_cannot_use_is_refused_before_the_first_round(platform, tmp_path):
    from alignd.jobs import ConfigError

    with pytest.raises(ConfigError, match="gold_scorer: the reward service has no scorer 'nope'"):
        run(_gold_config(tmp_path, "nope", "default", gold_scorer="nope"), platform)


def test_dpo_scores_its_policy_with_the_gold_scorer_and_stops_on_it(
    platform, tmp_path, monkeypatch
):
    """DPO with ``gold_scorer``: each evaluation pushes the policy to generation, samples the
    held-out prompts and scores them (``eval/gold``); with ``early_stop`` the proxy is the
    implicit reward margin — here scripted to rise while the gold falls after step 2."""
    from alignd import jobs
    from alignd.evaluation import Estimate, PolicyReport

    data = {"path": TASK.preferences_train, "limit": 24, "held_out": 4}
    config = DPOConfig(data=data, max_steps=2, eval_every=1, gold_scorer="oracle",
                       eval_max_new_tokens=6, **common(tmp_path, "dpo-gold"))  # fmt: skip
    before = platform.generation.info().weights_version
    rows = run(config, platform)
    assert platform.generation.info().weights_version == before + 2  # a push per evaluation
    for row in rows:
        assert {"eval/gold", "eval/gold_se", "eval/reward", "eval/kl", "eval/accuracy",
                "eval/margin"} <= row.keys()  # fmt: skip
        assert 0.0 <= row["eval/gold"] <= 1.0
    assert (tmp_path / "dpo-gold" / "checkpoints" / "best" / "alignd_checkpoint.json").is_file()

    gold, margin = iter([0.2, 0.6, 0.5, 0.4, 0.3]), iter([0.1, 0.2, 0.3, 0.4, 0.5])
    one = Estimate(0.0, 0.0, 1)
    monkeypatch.setattr(jobs.supervised, "evaluate_policy", lambda *a, **k: PolicyReport(
        "scripted", None, one, one, one, [], Estimate(next(gold), 0.0, 1)))  # fmt: skip
    implicit = lambda self: {"eval/accuracy": 1.0, "eval/margin": next(margin)}  # noqa: E731
    monkeypatch.setattr(jobs.supervised.DPOJob, "_implicit", implicit)
    stopping = config.model_copy(update={
        "run_dir": tmp_path / "dpo-stop", "max_steps": 5,
        "early_stop": jobs.config.EarlyStopConfig(patience=2)})  # fmt: skip
    rows = run(stopping, platform)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["early_stop"] == 1.0
    state = json.loads((tmp_path / "dpo-stop" / "state.json").read_text())
    assert state["gold"]["step"] == 2


def test_dpo_gold_settings_are_checked(platform, tmp_path):
    from alignd.jobs import ConfigError

    base = dict(data={"path": TASK.preferences_train}, run_dir="runs/x")
    with pytest.raises(ValueError, match="eval_samples applies with gold_scorer only"):
        DPOConfig(eval_samples=2, **base)
    with pytest.raises(ValueError, match="early_stop needs gold_scorer"):
        DPOConfig(early_stop={}, eval_every=1, **base)
    data = {"path": TASK.preferences_train, "limit": 24, "held_out": 4}
    config = DPOConfig(data=data, max_steps=1, gold_scorer="nope", **common(tmp_path, "d"))
    with pytest.raises(ConfigError, match="gold_scorer: the reward service has no scorer 'nope'"):
        run(config, platform)
