"""Chorus against what a Triton user would otherwise build, on the same members, the same
Triton and the same instance configs, under the same closed-loop client load:

- **Chorus**: the combiner's endpoint (batching stage, one call to the fan-out model, shared
  memory, numpy combine);
- **native ensemble**: ``platform: "ensemble"`` mapping the input to every member, then a
  Python-backend step that combines (softmax, mean; dynamic batching, vectorised);
- **async BLS**: one Python-backend model that fans out to the members with ``async_exec``
  for each batch the dynamic batcher hands it, and combines.

Then the combiner's own cost (a one-member ensemble through Chorus vs the member called directly
on Triton) and one copy of the input in shared memory vs tensors in the request for a large
input (3x224x224 FP32), in combiner CPU time per request and throughput.

    python -m benchmarks.baselines [--seconds 3]

Every client is the same: prebuilt KServe v2 gRPC requests on one asyncio channel, batch 1,
distinct rows; only the model name and port change. It runs on the same cores as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import onnx
import psutil
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.report import publish
from orchestrator.deploying.up import Deployment
from orchestrator.examples.digits.train import HERE, Split, load_split, train_members
from orchestrator.measuring.bench import Load, closed_loop
from orchestrator.planning.spec import Ensemble, load_ensemble
from tests.onnx_models import linear

CONCURRENCY = (1, 8, 64)

# What both baselines' Python models share: the rule (softmax, mean) and the answers split
# back per request of the batch the dynamic batcher handed them.
_COMMON_PY = """
import asyncio
import json
import numpy as np
import triton_python_backend_utils as pb_utils


def combine(stacked):
    e = np.exp(stacked - stacked.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).mean(0).astype(np.float32)


def respond(out, sizes):
    responses, start = [], 0
    for n in sizes:
        tensor = pb_utils.Tensor("logits", out[start:start + n])
        responses.append(pb_utils.InferenceResponse([tensor]))
        start += n
    return responses
"""

COMBINE_PY = (
    _COMMON_PY
    + """

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]

    def execute(self, requests):
        parts = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                 for r in requests]
        sizes = [len(p[0]) for p in parts]
        stacked = np.stack([np.concatenate([p[i] for p in parts]) for i in range(len(self.inputs))])
        return respond(combine(stacked), sizes)
"""
)

BLS_PY = (
    _COMMON_PY
    + """

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.members = json.loads(config["parameters"]["members"]["string_value"])

    async def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        sizes = [len(x) for x in xs]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        calls = [
            pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=[output],
                inputs=[pb_utils.Tensor(input_name, x)],
            ).async_exec()
            for name, input_name, output in self.members
        ]
        answers = await asyncio.gather(*calls)
        outs = []
        for (name, _, output), answer in zip(self.members, answers):
            if answer.has_error():
                error = pb_utils.TritonError(f"{name}: {answer.error().message()}")
                return [pb_utils.InferenceResponse(error=error) for _ in requests]
            outs.append(pb_utils.get_output_tensor_by_name(answer, output).as_numpy())
        return respond(combine(np.stack(outs)), sizes)
"""
)


def _io(name: str, dims: list[int]) -> str:
    return f'{{ name: "{name}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ] }}'


def add_baselines(
    ensemble: Ensemble,
    repo: Path,
    triton_url: str,
    max_batch: int,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Write the native ensemble (+ its combine step) and the BLS model next to the members
    in the served repository, and load them on its Triton."""
    (image,) = ensemble.inputs
    (logits,) = ensemble.outputs
    members = [
        (m.name, dict(m.input_map)[image.name], dict(m.output_map)[logits.name])
        for m in ensemble.members
    ]
    in_dims, out_dims = list(image.shape), list(logits.shape)
    batching = "dynamic_batching { }\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"

    def write(name: str, config: str, model: str | None = None) -> None:
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(config)
        if model is not None:
            (repo / name / "1" / "model.py").write_text(model)

    write(
        "native_combine",
        f'name: "native_combine"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        f"input [ {', '.join(_io(f'm{i}', out_dims) for i in range(len(members)))} ]\n"
        f"output [ {_io('logits', out_dims)} ]\n{batching}",
        COMBINE_PY,
    )
    steps = [
        f'{{ model_name: "{name}" model_version: -1 input_map {{ key: "{inp}" value: "image" }} '
        f'output_map {{ key: "{out}" value: "m{i}" }} }}'
        for i, (name, inp, out) in enumerate(members)
    ]
    steps.append(
        '{ model_name: "native_combine" model_version: -1 '
        + " ".join(f'input_map {{ key: "m{i}" value: "m{i}" }}' for i in range(len(members)))
        + ' output_map { key: "logits" value: "logits" } }'
    )
    write(
        "native",
        f'name: "native"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        f"input [ {_io('image', in_dims)} ]\noutput [ {_io('logits', out_dims)} ]\n"
        f"ensemble_scheduling {{ step [ {', '.join(steps)} ] }}\n",
    )
    members_json = json.dumps(json.dumps(members))
    write(
        "bls",
        f'name: "bls"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        f"input [ {_io('image', in_dims)} ]\noutput [ {_io('logits', out_dims)} ]\n"
        f'parameters {{ key: "members" value: {{ string_value: {members_json} }} }}\n'
        f"{batching}",
        BLS_PY,
    )
    with grpcclient.InferenceServerClient(triton_url) as client:
        for name in ("native_combine", "native", "bls"):
            client.load_model(name, headers=dict(headers or {}))  # Chorus's key to Triton


def digits_example() -> tuple[Split, Ensemble]:
    """The digits example's data split and ensemble, its members trained if they are not yet."""
    split = load_split()
    if not (HERE / "models" / "mlp.onnx").is_file():
        train_members(HERE / "models", split)
    return split, load_ensemble(HERE / "ensemble.yaml")


def requests_for(
    model: str, input_name: str, x: np.ndarray, count: int = 256, batch: int = 1
) -> list:
    """Prebuilt requests of ``batch`` rows on distinct rows, so the client costs the same
    everywhere."""
    out = []
    for i in range(min(count, len(x) - batch + 1)):
        row = np.ascontiguousarray(x[i : i + batch])
        req = service_pb2.ModelInferRequest(model_name=model)
        req.inputs.add(name=input_name, datatype="FP32", shape=row.shape)
        req.raw_input_contents.append(row.tobytes())
        out.append(req)
    return out


def load(
    url: str,
    requests: list,
    concurrency: int,
    seconds: float,
    headers: Mapping[str, str] | None = None,
) -> Load:
    """Closed-loop load of prebuilt requests; ``headers``: Chorus's key, to call Triton."""
    metadata = tuple((headers or {}).items())

    async def go() -> Load:
        channel = grpc.aio.insecure_channel(
            url, options=[("grpc.max_send_message_length", 2**31 - 1)]
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = np.arange(len(requests), dtype=np.float32)[:, None]
        try:
            return await closed_loop(
                lambda rows: stub.ModelInfer(requests[int(rows[0, 0])], metadata=metadata),
                index,
                1,
                concurrency,
                seconds,
            )
        finally:
            await channel.close()

    return asyncio.run(go())


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of these processes (those gone meanwhile count nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


T = TypeVar("T")


def interleaved(
    cases: dict[str, Callable[[], T]], rounds: int, speed: Callable[[T], float]
) -> dict[str, T]:
    """Run every case once a round, rotating the order, and keep each case's median round by
    ``speed``: this machine's speed drifts, and cases measured side by side drift together."""
    got: dict[str, list[T]] = {label: [] for label in cases}
    labels = list(cases)
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            got[label].append(cases[label]())
    return {label: sorted(runs, key=speed)[len(runs) // 2] for label, runs in got.items()}


def _speed(result: Load | tuple) -> float:
    load = result[0] if isinstance(result, tuple) else result
    return float(load.samples_per_s)


@contextmanager
def served(ensemble: Ensemble, prefix: str, **options: object) -> Iterator[Deployment]:
    d = Deployment(ensemble, Path(tempfile.mkdtemp(prefix=prefix)), **options)  # type: ignore[arg-type]
    d.start()
    try:
        yield d
    finally:
        d.stop()


def row(label: str, c: int, r: Load) -> str:
    return f"| {label} | {c} | {r.samples_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |"


def compare(ensemble: Ensemble, x: np.ndarray, seconds: float, rounds: int) -> list[str]:
    lines = []
    with served(ensemble, "chorus-baselines-") as d:
        assert d.endpoints is not None
        triton = d.endpoints.triton_grpc
        key = d.endpoints.triton_headers
        add_baselines(ensemble, d.workdir / "repository", triton, ensemble.max_batch_size, key)
        variants = {
            "Chorus": (d.endpoints.ensemble, requests_for(ensemble.name, "image", x), {}),
            "native ensemble": (triton, requests_for("native", "image", x), key),
            "async BLS": (triton, requests_for("bls", "image", x), key),
        }
        results: dict[tuple[str, int], Load] = {}
        for c in CONCURRENCY:
            cases = {
                label: (lambda url=url, reqs=reqs, h=h, c=c: load(url, reqs, c, seconds, h))
                for label, (url, reqs, h) in variants.items()
            }
            for label, r in interleaved(cases, rounds, _speed).items():
                results[label, c] = r
                print(f"{label} c{c}: {r.samples_per_s:,.0f}/s p50 {r.p50_ms:.2f}", flush=True)
    lines += [
        "| endpoint | concurrency | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *(row(label, c, results[label, c]) for c in CONCURRENCY for label in variants),
        "",
    ]
    for c in CONCURRENCY:
        ours, native, bls = (results[label, c] for label in variants)
        ratio = ours.samples_per_s / native.samples_per_s
        lines.append(
            f"- concurrency {c}: Chorus / native = {ratio:.2f}x "
            f"throughput, p99 {ours.p99_ms:.2f} vs {native.p99_ms:.2f} ms, p50 "
            f"{ours.p50_ms - native.p50_ms:+.2f} ms; Chorus / BLS = "
            f"{ours.samples_per_s / bls.samples_per_s:.2f}x"
        )
    return lines


def own_cost(
    ensemble: Ensemble, x: np.ndarray, seconds: float, rounds: int, root: Path
) -> list[str]:
    member = next(m for m in ensemble.members if m.name == "cnn")
    one_file = root / "one.yaml"
    one_file.write_text(
        f"name: one\nmembers:\n  - {{name: cnn, path: {member.path}}}\n"
        "combine: {rule: mean, softmax: true}\nserving: {max_batch_size: 64}\n"
    )
    one = load_ensemble(one_file)
    ((_, member_input),) = member.input_map
    results = {}
    with served(one, "chorus-own-cost-") as d:
        assert d.endpoints is not None
        direct = requests_for("cnn", member_input, x)
        ours = requests_for("one", "image", x)
        for c in CONCURRENCY:
            cases = {
                "member on Triton": lambda c=c: load(
                    d.endpoints.triton_grpc, direct, c, seconds, d.endpoints.triton_headers
                ),
                "through Chorus": lambda c=c: load(d.endpoints.ensemble, ours, c, seconds),
            }
            for label, r in interleaved(cases, rounds, _speed).items():
                results[label, c] = r
    lines = [
        "| path | concurrency | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *(
            row(label, c, results[label, c])
            for c in CONCURRENCY
            for label in ("member on Triton", "through Chorus")
        ),
        "",
    ]
    for c in CONCURRENCY:
        direct, ours = results["member on Triton", c], results["through Chorus", c]
        lines.append(
            f"- concurrency {c}: Chorus adds {ours.p50_ms - direct.p50_ms:+.2f} ms at the median; "
            f"throughput {ours.samples_per_s / direct.samples_per_s:.2f}x the member's"
        )
    return lines


def big_members(root: Path, count: int = 4) -> Ensemble:
    """Members taking 3x224x224 images whose work is small (average pool, then linear), so
    moving the input is what costs."""
    for k in range(count):
        rng = np.random.default_rng(k)
        w = numpy_helper.from_array(rng.normal(size=(3, 10)).astype(np.float32), "W")
        graph = helper.make_graph(
            [
                helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                helper.make_node("Flatten", ["pooled"], ["flat"]),
                helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            ],
            "big",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
            initializer=[w],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(root / f"big{k}.onnx"))
    members = "".join(f"  - {{name: big{k}, path: big{k}.onnx}}\n" for k in range(count))
    (root / "big.yaml").write_text(
        f"name: big\nmembers:\n{members}combine: {{rule: mean}}\nserving: {{max_batch_size: 8}}\n"
    )
    return load_ensemble(root / "big.yaml")


def cnn_members(root: Path, widths: tuple[int, ...] = (16, 24, 32, 48)) -> Ensemble:
    """Four convolutional members on 3x64x64 images (two strided 3x3 convolutions, average
    pool, linear; random weights: only their cost matters), 2-13 MFLOP a sample: members whose
    work, not the combiner's, is most of a request."""
    for k, width in enumerate(widths):
        rng = np.random.default_rng(k)

        def weight(name: str, *shape: int, rng: np.random.Generator = rng) -> onnx.TensorProto:
            scale = 1.0 / np.sqrt(np.prod(shape[1:]))
            return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

        conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        graph = helper.make_graph(
            [
                helper.make_node("Conv", ["image", "W1"], ["c1"], **conv),
                helper.make_node("Relu", ["c1"], ["r1"]),
                helper.make_node("Conv", ["r1", "W2"], ["c2"], **conv),
                helper.make_node("Relu", ["c2"], ["r2"]),
                helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
                helper.make_node("Flatten", ["pooled"], ["flat"]),
                helper.make_node("MatMul", ["flat", "W3"], ["logits"]),
            ],
            f"cnn{k}",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 64, 64])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
            initializer=[
                weight("W1", width, 3, 3, 3),
                weight("W2", 2 * width, width, 3, 3),
                weight("W3", 2 * width, 10),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(root / f"cnn{k}.onnx"))
    members = "".join(f"  - {{name: cnn{k}, path: cnn{k}.onnx}}\n" for k in range(len(widths)))
    (root / "cnn.yaml").write_text(
        f"name: cnn\nmembers:\n{members}combine: {{rule: mean, softmax: true}}\n"
        "serving: {max_batch_size: 16}\n"
    )
    return load_ensemble(root / "cnn.yaml")


def _cpu_load(d: Deployment, requests: list, c: int, seconds: float) -> tuple[Load, float, float]:
    """A load on the ensemble, with the combiner's and Triton's CPU seconds per request."""
    assert d.endpoints is not None and d.combiner is not None and d.triton is not None
    combiner = descendants(d.combiner.pid or 0)
    triton = descendants(d.triton.process.pid or 0)
    before = cpu_seconds(combiner), cpu_seconds(triton)
    r = load(d.endpoints.ensemble, requests, c, seconds)
    after = cpu_seconds(combiner), cpu_seconds(triton)
    n = max(r.requests, 1)
    return r, (after[0] - before[0]) / n, (after[1] - before[1]) / n


def shared_memory(seconds: float, rounds: int, root: Path) -> list[str]:
    big = big_members(root)
    x = np.random.default_rng(0).random((64, 3, 224, 224), dtype=np.float32)
    with (
        served(big, "chorus-shm-off-", shared_memory=False) as off,
        served(big, "chorus-shm-on-", shared_memory=True) as on,
    ):
        return side_by_side(
            "input",
            {"in the request": off, "shared memory": on},
            requests_for("big", "image", x, 64),
            (1, 8),
            seconds,
            rounds,
        )


def side_by_side(
    what: str,
    deployments: dict[str, Deployment],
    requests: list,
    concurrencies: tuple[int, ...],
    seconds: float,
    rounds: int,
) -> list[str]:
    """Two deployments of one ensemble under the same load, interleaved: throughput, latency
    and CPU per request of the combiner and of Triton; then the second's ratios to the first."""
    results = {}
    for c in concurrencies:
        cases = {
            label: lambda d=d, c=c: _cpu_load(d, requests, c, seconds)
            for label, d in deployments.items()
        }
        for label, got in interleaved(cases, rounds, _speed).items():
            results[label, c] = got
            print(f"{what}, {label}, c{c}: {got[0].samples_per_s:,.0f}/s", flush=True)
    lines = [
        f"| {what} | concurrency | requests/s | p50 ms | p99 ms "
        "| combiner CPU ms/request | Triton CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        for label in deployments:
            r, ours, theirs = results[label, c]
            lines.append(f"{row(label, c, r)} {ours * 1000:.2f} | {theirs * 1000:.2f} |")
    lines.append("")
    base, other = deployments
    for c in concurrencies:
        first, second = results[base, c], results[other, c]
        lines.append(
            f"- concurrency {c}: {other} / {base} = "
            f"{second[0].samples_per_s / first[0].samples_per_s:.2f}x throughput, combiner CPU "
            f"per request {second[1] / first[1]:.2f}x"
        )
    return lines


def output_memory(seconds: float, rounds: int, root: Path) -> list[str]:
    """Wide outputs (4 members x 4096 FP32 a row, batch 16: 1 MiB a batch) back from Triton
    in the response vs through shared memory."""
    for k in range(4):
        linear(root / f"wide{k}.onnx", in_dim=64, out_dim=4096, seed=k)
    members = "".join(f"  - {{name: wide{k}, path: wide{k}.onnx}}\n" for k in range(4))
    (root / "wide.yaml").write_text(
        f"name: wide\nmembers:\n{members}combine: {{rule: mean}}\nserving: {{max_batch_size: 16}}\n"
    )
    wide = load_ensemble(root / "wide.yaml")
    x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    with (
        served(
            wide, "chorus-out-off-", combiner_options={"output_shared_memory_min_bytes": None}
        ) as off,
        served(
            wide, "chorus-out-on-", combiner_options={"output_shared_memory_min_bytes": 0}
        ) as on,
    ):
        return side_by_side(
            "member outputs",
            {"in the response": off, "shared memory": on},
            requests_for("wide", "x", x, 64, batch=16),
            (1, 4),
            seconds,
            rounds,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; the median is kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines.md"))
    args = parser.parse_args()
    split, ensemble = digits_example()
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    x = split.x_test
    lines = [
        "# Chorus vs Triton's native ensemble and an async BLS model",
        "",
        f"`python -m benchmarks.baselines --seconds {args.seconds} --rounds {args.rounds}` on "
        f"{os.cpu_count()} CPU "
        "cores, the bundled Triton (Python backend running each member's ONNX file), one "
        "instance of each member. Client: batch-1 requests on distinct rows, closed loop, "
        "prebuilt protobufs on one gRPC channel, the same for every endpoint. Each row is the "
        "median of its interleaved rounds (cases of a table run in turn, in rotating order), "
        "since this shared machine's speed drifts by up to 1.5x between minutes.",
        "",
        "## The digits ensemble (4 members, softmax + mean)",
        "",
        *compare(ensemble, x, args.seconds, args.rounds),
        "",
        "## Heavier members: 4 CNNs on 3x64x64 images (softmax + mean)",
        "",
        *compare(
            cnn_members(root),
            np.random.default_rng(1).random((256, 3, 64, 64), dtype=np.float32),
            args.seconds,
            args.rounds,
        ),
        "",
        "## The combiner's own cost: a one-member ensemble vs the member directly",
        "",
        *own_cost(ensemble, x, args.seconds, args.rounds, root),
        "",
        "## One copy of the input: 3x224x224 FP32 (588 KiB a request), 4 members",
        "",
        *shared_memory(args.seconds, args.rounds, root),
        "",
        "## Member outputs: 4 x 4096 FP32 a row, batch-16 requests (1 MiB a batch)",
        "",
        *output_memory(args.seconds, args.rounds, root),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
