"""``--deterministic``: a service process whose torch kernels are deterministic."""

from __future__ import annotations

import numpy as np

from alignd.local import LocalService


def test_a_deterministic_service_says_so_and_gives_the_same_numbers(tiny_models, tmp_path):
    log = tmp_path / "reference.log"
    args = ["--model", str(tiny_models.causal_lm), "--metrics-port", "-1", "--deterministic"]
    rows = [list(range(5, 30)), list(range(7, 19))]
    with LocalService("reference", args, log_file=log) as service:
        with service.client() as client:
            first = client.logprobs(rows, [2, 3], isolated=True)
            again = client.logprobs(rows, [2, 3], isolated=True)
    assert "deterministic torch algorithms on" in log.read_text()
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
