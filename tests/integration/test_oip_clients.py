"""Real outside clients of the reward service's Open Inference Protocol endpoint: tritonclient
(in its own environment, ``.venv-triton``: it needs protobuf < 7) and grpcurl. Both get the
scores that ``Score`` gives the same items."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import numpy as np

from alignd import RewardClient

DRIVER = Path(__file__).with_name("triton_run.py")
ORACLE = "oracle=function:alignd.tasks.sentiment:oracle_scorer"
PROMPTS = ["How is the weather?", "Tell me a story.", "Hi"]
RESPONSES = ["Sunny and warm.", "Once upon a time there was a dragon.", ""]


def triton(python: str, target: str, model: str, items: dict, token: str = "-"):
    return subprocess.run([python, str(DRIVER), target, model, token], input=json.dumps(items),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_tritonclient_scores_as_score_does(triton_python, start_reward):
    service = start_reward("--scorers", ORACLE)
    items = {"prompts": PROMPTS, "responses": RESPONSES}
    result = triton(triton_python, service.target, "default", items)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["live"], answer["ready"], answer["model_ready"]) == (True, True, True)
    assert answer["server"]["name"] == "alignd"
    assert answer["id"] == "triton-1"
    model = answer["model"]
    assert model["versions"] == ["1"]
    assert [(i["name"], i["datatype"]) for i in model["inputs"]] == [
        ("prompt", "BYTES"), ("response", "BYTES"), ("label", "BYTES")]  # fmt: skip
    assert [(o["name"], o["datatype"]) for o in model["outputs"]] == [("score", "FP32")]
    with RewardClient(service.target) as client:
        expected = client.score(PROMPTS, RESPONSES)
        oracle = client.score(PROMPTS, RESPONSES, scorer="oracle")
    np.testing.assert_allclose(answer["scores"], expected, atol=1e-5)
    result = triton(triton_python, service.target, "oracle", items)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(json.loads(result.stdout)["scores"], oracle, atol=1e-6)


def test_tritonclient_needs_the_token_when_auth_is_on(triton_python, start_reward, tmp_path):
    (tokens := tmp_path / "tokens").write_text("s3cret\n")
    service = start_reward("--auth-token-file", str(tokens))
    items = {"prompts": PROMPTS[:1], "responses": RESPONSES[:1]}
    denied = triton(triton_python, service.target, "default", items)
    assert denied.returncode != 0
    assert "UNAUTHENTICATED" in denied.stderr or "Unauthenticated" in denied.stderr
    allowed = triton(triton_python, service.target, "default", items, token="s3cret")
    assert allowed.returncode == 0, allowed.stderr


def test_grpcurl_calls_the_inference_service_through_reflection(grpcurl, reward_process):
    def call(method: str, body: dict) -> dict:
        result = subprocess.run(
            [grpcurl, "-plaintext", "-d", json.dumps(body), reward_process.target,
             f"inference.GRPCInferenceService/{method}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    listed = subprocess.run([grpcurl, "-plaintext", reward_process.target, "list"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert "inference.GRPCInferenceService" in listed.stdout.split()
    assert call("ServerLive", {}) == {"live": True}
    assert call("ModelReady", {"name": "default"}) == {"ready": True}

    def tensor(name: str, values: list[str]) -> dict:
        encoded = [base64.b64encode(v.encode()).decode() for v in values]
        return {"name": name, "datatype": "BYTES", "shape": [len(values)],
                "contents": {"bytes_contents": encoded}}  # fmt: skip

    answer = call("ModelInfer", {"model_name": "default", "inputs": [
        tensor("prompt", PROMPTS), tensor("response", RESPONSES)]})  # fmt: skip
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("score", "FP32", ["3"])
    with RewardClient(reward_process.target) as client:
        expected = client.score(PROMPTS, RESPONSES)
    assert "fp32_contents" in output["contents"], answer
    np.testing.assert_allclose(output["contents"]["fp32_contents"], expected, atol=1e-5)
