"""Wide member outputs come back through shared memory; narrow ones in the response."""

from __future__ import annotations

import urllib.request

import numpy as np
import onnxruntime as ort
import yaml

from combiner.config import CombinerConfig
from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from orchestrator.deploying.up import Deployment
from orchestrator.planning.spec import load_ensemble
from tests.integration.test_workers import metric
from tests.onnx_models import linear

WIDTH = 4096  # 16 KiB of FP32 per row and member


def test_wide_outputs_go_through_shared_memory_and_answer_right(tmp_path):
    for i in range(2):
        linear(tmp_path / f"w{i}.onnx", in_dim=8, out_dim=WIDTH, seed=20 + i)
    (tmp_path / "ensemble.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "wide",
                "members": [{"name": f"w{i}", "path": f"w{i}.onnx"} for i in range(2)],
                "combine": {"rule": "mean"},
                "serving": {"max_batch_size": 16},
            }
        )
    )
    ensemble = load_ensemble(tmp_path / "ensemble.yaml")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with Deployment(ensemble, tmp_path / "work", metrics_port=port) as endpoints:

        def shared(direction: str) -> float:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            if f'direction="{direction}"' not in text:
                return 0.0
            return metric(text, "chorus_shared_memory_bytes_total", direction=direction)

        with EnsembleClient(endpoints.ensemble) as client:
            for rows in (1, 3, 16):  # 32, 96 and 512 KiB of member outputs a batch
                x = np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32)
                before = shared("output")
                answer = client.predict(x)
                expected = np.mean(
                    [
                        ort.InferenceSession(str(m.path)).run(None, {"x": x})[0]
                        for m in ensemble.members
                    ],
                    axis=0,
                )
                np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-4)
                through_shm = shared("output") - before
                size = rows * 2 * WIDTH * 4
                least = CombinerConfig.model_fields["output_shared_memory_min_bytes"].default
                assert through_shm == (size if size >= least else 0)
