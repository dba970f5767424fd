"""``alignd demo``: the main job, run end to end on local services.

It prepares the bundled models, starts the reward and reference services as child processes
on loopback, and runs a round trip through them (server info, tokenization of a chat prompt
with its completion), printing what each service reports.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from alignd.local import LocalService


def _prepare(home: str | None) -> None:
    try:
        from alignd_server.common.prepare import prepare_models
    except ImportError as err:
        raise SystemExit(
            f"the demo needs the server packages: pip install 'alignd[serve]' ({err})"
        ) from err
    prepare_models(None, home=home, progress=print)


def run_demo(home: str | None = None) -> int:
    """Runs the demo; returns the process exit code."""
    start = time.perf_counter()
    print("== preparing models")
    _prepare(home)
    env = {"ALIGND_HOME": str(home)} if home else {}
    logs = Path(tempfile.mkdtemp(prefix="alignd-demo-"))
    print(f"== starting services (logs in {logs})")
    flags = ["--metrics-port", "-1"]
    with (
        LocalService("reward", flags, log_file=logs / "reward.log", env=env) as reward,
        LocalService("reference", flags, log_file=logs / "reference.log", env=env) as reference,
    ):
        with reward.client() as client:
            info = client.info()
            scorer = info.scorers[0]
            print(
                f"reward     {reward.target}  scorer {scorer.name!r}: {scorer.model.name} "
                f"({scorer.model.architecture}, {scorer.model.num_parameters / 1e6:.1f}M params)"
            )
        with reference.client() as client:
            info = client.info()
            model = info.server.model
            print(
                f"reference  {reference.target}  {model.name} ({model.architecture}, "
                f"{model.num_parameters / 1e6:.1f}M params, vocab {model.vocab_size})"
            )
            chat = [{"role": "user", "content": "Say something kind about mornings."}]
            (row,) = client.tokenize([chat], ["Mornings are a fresh start."])
            completion = row.input_ids[row.prompt_length :]
            print(
                f"tokenize   {len(row.input_ids)} tokens: {row.prompt_length} prompt + "
                f"{len(completion)} completion (loss mask sum {int(row.loss_mask.sum())})"
            )
    print(f"== done in {time.perf_counter() - start:.1f}s")
    return 0
