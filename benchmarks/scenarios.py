"""The paper's scale, on paper: 12 ImageNet CNNs and V100 GPUs, from published numbers.

Latencies (ms per batch, FP32, one V100-SXM2-16GB, PyTorch 21.03 NGC container, "Latency Avg"
column) are NVIDIA's own, from the Deep Learning Examples performance pages:

* ResNet-50 v1.5: github.com/NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/
  resnet50v1.5/README.md, "Inference performance: NVIDIA DGX-1 (1x V100 16GB)", FP32 table;
* ResNeXt-101 32x4d: .../ConvNets/resnext101-32x4d/README.md, same section (batch 128 is
  "N/A" there, so its curve stops at 64);
* SE-ResNeXt-101 32x4d: .../ConvNets/se-resnext101-32x4d/README.md, same section;
* EfficientNet-B0 and -B4: .../ConvNets/efficientnet/README.md, "Inference performance:
  NVIDIA V100 (1x V100 16GB)", FP32 table (B4 stops at 128 there).

The other seven members have no published V100 table; their curves are ResNet-50's, scaled by
their cost in FLOPs relative to ResNet-50 (4.09 GFLOPs), from the torchvision model
documentation's "GFLOPS" column: ResNet-18 1.81, ResNet-34 3.66, ResNet-101 7.80, ResNet-152
11.51, Wide ResNet-50-2 11.40, DenseNet-121 2.83, VGG-16 15.47. This is an extrapolation:
real GPUs run VGG better and DenseNet worse than their FLOPs say.

Memory is not in those tables. An instance needs its FP32 weights (4 bytes per parameter,
torchvision's "Params" column) plus 512 MiB of framework workspace, plus activations per
sample: 40 MiB per sample for ResNet-50, scaled by FLOPs for the others (activations grow with
the work per image at the same resolution; EfficientNet-B4 runs at 380 px, which its FLOPs
already count). These are assumptions, stated so the scenario can be argued with; with them
ResNet-50 at batch 256 needs 10.6 GiB, ResNeXt-101 at 64 needs 5.6 GiB.

Cascades (:data:`CASCADES`): the same twelve in two tiers, the six cheapest (by V100 time per
image at batch 64: ResNet-18, EfficientNet-B0, DenseNet-121, ResNet-34, ResNet-50,
ResNet-101) answering every row, the six dearest only the rows on which the first tier
disagrees. The share of rows that go on, :data:`SECOND_TIER_SHARE` = 0.3, is our assumption,
not a measurement: the cascade literature on ImageNet (Wang et al., "Wisdom of Committees",
arXiv 2012.01988; Kolawole et al., "Revisiting Cascaded Ensembles for Efficient Inference", the
agreement-based cascade, arXiv 2407.02348) finds most images easy enough for the cheap first
models, so we take 70% answered by the first tier as a middle value. A real deployment takes
its shares from ``chorus calibrate``; the benchmark also plans at 0.1 and 0.5 to show how
the gain depends on the share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Curve, Profile

GiB = 1 << 30
MiB = 1 << 20
_WORKSPACE = 512 * MiB
_R50_ACTIVATIONS = 40 * MiB  # per sample
_R50_GFLOPS = 4.09

# (batch size, ms): published FP32 latency on one V100 16GB
RESNET50 = (
    (1, 10.37),
    (2, 10.24),
    (4, 10.46),
    (8, 11.5),
    (16, 16.07),
    (32, 29.37),
    (64, 55.4),
    (128, 109.26),
    (256, 214.48),
)
MEASURED: dict[str, tuple[float, float, tuple[tuple[int, float], ...]]] = {
    # name: (GFLOPs, millions of parameters, latency curve)
    "resnet50": (_R50_GFLOPS, 25.56, RESNET50),
    "resnext101_32x4d": (
        8.0,
        44.18,
        ((1, 21.02), (2, 22.14), (4, 22.57), (8, 24.35), (16, 40.04), (32, 73.71), (64, 131.04)),
    ),
    "se_resnext101_32x4d": (
        8.0,
        48.96,
        (
            (1, 24.92),
            (2, 24.89),
            (4, 31.58),
            (8, 32.29),
            (16, 44.5),
            (32, 76.86),
            (64, 138.36),
            (128, 262.64),
            (256, 519.84),
        ),
    ),
    "efficientnet_b0": (
        0.39,
        5.29,
        (
            (1, 13.15),
            (2, 13.17),
            (4, 13.25),
            (8, 13.42),
            (16, 13.78),
            (32, 16.46),
            (64, 25.14),
            (128, 48.03),
            (256, 94.86),
        ),
    ),
    "efficientnet_b4": (
        4.39,
        19.34,
        (
            (1, 23.31),
            (2, 24.07),
            (4, 26.29),
            (8, 26.65),
            (16, 48.18),
            (32, 89.07),
            (64, 173.2),
            (128, 346.32),
        ),
    ),
}
SCALED: dict[str, tuple[float, float]] = {  # name: (GFLOPs, millions of parameters)
    "resnet18": (1.81, 11.69),
    "resnet34": (3.66, 21.80),
    "resnet101": (7.80, 44.55),
    "resnet152": (11.51, 60.19),
    "wide_resnet50_2": (11.40, 68.88),
    "densenet121": (2.83, 7.98),
    "vgg16": (15.47, 138.36),
}
TWELVE = (*MEASURED, *SCALED)


def _curve(gflops: float, params_m: float, latency: tuple[tuple[int, float], ...]) -> Curve:
    return Curve(
        int(4 * params_m * 1e6 + _WORKSPACE),
        int(_R50_ACTIVATIONS * gflops / _R50_GFLOPS),
        latency,
    )


def v100_profile() -> Profile:
    """The twelve members' curves under the key ``gpu``."""
    curves = {name: _curve(*measured) for name, measured in MEASURED.items()}
    for name, (gflops, params) in SCALED.items():
        scaled = tuple((b, ms * gflops / _R50_GFLOPS) for b, ms in RESNET50)
        curves[name] = _curve(gflops, params, scaled)
    return Profile({name: {"gpu": c} for name, c in curves.items()})


def v100s(nodes: int, per_node: int, memory_gib: int) -> tuple[Device, ...]:
    name = f"Tesla V100-SXM2-{memory_gib}GB"
    return tuple(
        Device(f"node{i}", "gpu", j, name, memory_gib * GiB, memory_gib * GiB)
        for i in range(nodes)
        for j in range(per_node)
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    members: tuple[str, ...]
    devices: tuple[Device, ...]
    max_batch_size: int = 256
    # with a cascade: the share of the ensemble's rows that reach each member (1 if not named)
    shares: Mapping[str, float] | None = None


SCENARIOS = (
    Scenario("12 CNNs, 4 x V100-16GB", TWELVE, v100s(1, 4, 16)),
    Scenario("12 CNNs, 4 x V100-32GB", TWELVE, v100s(1, 4, 32)),
    Scenario("ResNet-50, 16 x V100-16GB (4 nodes)", ("resnet50",), v100s(4, 4, 16)),
    Scenario("12 CNNs, 16 x V100-16GB (4 nodes)", TWELVE, v100s(4, 4, 16)),
)


def cheapest(members: tuple[str, ...], count: int, batch_size: int = 64) -> tuple[str, ...]:
    """The ``count`` members that take the least V100 time per image at ``batch_size`` (the
    first tier of a cascade is its cheapest members)."""
    curves = v100_profile().members

    def per_image(m: str) -> float:
        latency = curves[m]["gpu"].latency(batch_size)
        assert latency is not None, m
        return latency / batch_size

    return tuple(sorted(members, key=per_image)[:count])


SECOND_TIER_SHARE = 0.3  # of the rows, go on to the second tier (an assumption: see above)
FIRST_TIER = cheapest(TWELVE, 6)
SECOND_TIER = tuple(m for m in TWELVE if m not in FIRST_TIER)


def two_tiers(scenario: Scenario, share: float = SECOND_TIER_SHARE) -> Scenario:
    """The scenario served as a cascade: the first tier sees every row, the second ``share``."""
    return Scenario(
        f"{scenario.name}, cascade (tier 2 sees {share:g})",
        scenario.members,
        scenario.devices,
        scenario.max_batch_size,
        dict.fromkeys(SECOND_TIER, share),
    )


CASCADES = (two_tiers(SCENARIOS[0]), two_tiers(SCENARIOS[3]))
SHARE_SWEEP = (0.1, 0.5)  # also planned (without the references) for each cascade
