"""Jobs: SFT, reward model, DPO, PPO and GRPO/RLOO composed from the four services.

``run_job(config, platform)`` (or ``alignd run job.yaml``) picks the job of the config's kind::

    platform = alignd.Platform.from_state("~/.cache/alignd/platform")
    for row in alignd.jobs.PPOJob(config, platform).run():
        print(row["step"], row["reward"])
"""

from __future__ import annotations

from alignd.jobs.base import Job, JobFailed
from alignd.jobs.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    JobConfig,
    PPOConfig,
    RewardModelConfig,
    SFTConfig,
    load_job_config,
    parse_job_config,
)
from alignd.jobs.online import GRPOJob, PPOJob
from alignd.jobs.rundir import RunDirectory, RunDirectoryError
from alignd.jobs.supervised import DPOJob, RewardModelJob, SFTJob

JOBS: dict[str, type[Job]] = {
    "sft": SFTJob,
    "reward_model": RewardModelJob,
    "dpo": DPOJob,
    "ppo": PPOJob,
    "grpo": GRPOJob,
}


def make_job(config: JobConfig, platform, **options) -> Job:
    """The job that runs ``config`` on ``platform`` (options: ``resume``, ``progress``)."""
    return JOBS[config.kind](config, platform, **options)


__all__ = [
    "JOBS",
    "ConfigError",
    "DPOConfig",
    "DPOJob",
    "GRPOConfig",
    "GRPOJob",
    "Job",
    "JobConfig",
    "JobFailed",
    "PPOConfig",
    "PPOJob",
    "RewardModelConfig",
    "RewardModelJob",
    "RunDirectory",
    "RunDirectoryError",
    "SFTConfig",
    "SFTJob",
    "load_job_config",
    "make_job",
    "parse_job_config",
]
