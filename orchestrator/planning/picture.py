"""``chorus plan --png``: the allocation matrix as a picture (matplotlib, no display needed).

Left, devices by members: each cell the member's instances on that device, with its batch
size (and, with a cascade, the member's share of the rows under its name); right, each device's
planned memory against its total.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.planning.plan import Plan

__all__ = ["draw_plan"]

_GIB = 1 << 30


def draw_plan(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    import numpy as np

    devices = [d.id for d in plan.devices]
    counts = np.array([[plan.instances[m].get(d, 0) for m in plan.members] for d in devices])
    height = 1.6 + 0.35 * len(devices)
    width = 4 + 0.9 * len(plan.members)
    fig, (grid, memory) = plt.subplots(
        1, 2, figsize=(width + 3, height), width_ratios=(width, 3), sharey=True
    )
    grid.imshow(counts, cmap="Blues", aspect="auto", vmin=0, vmax=max(1, int(counts.max())))
    for i in range(len(devices)):
        for j, m in enumerate(plan.members):
            if counts[i, j]:
                grid.text(
                    j,
                    i,
                    f"{counts[i, j]}\n@{plan.max_batch_size[m]}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black",
                )
    names = [f"{m}\n{plan.shares[m]:g} of rows" if m in plan.shares else m for m in plan.members]
    grid.set_xticks(range(len(plan.members)), names, rotation=45, ha="right", fontsize=8)
    grid.set_yticks(range(len(devices)), devices, fontsize=8)
    grid.set_title("instances @ batch size", fontsize=9)
    used = [plan.planned_memory_bytes.get(d.id, 0) / _GIB for d in plan.devices]
    total = [d.memory_bytes / _GIB for d in plan.devices]
    rows = np.arange(len(devices))
    memory.barh(rows, total, color="#dddddd", label="total")
    memory.barh(rows, used, color="#4c72b0", label="planned")
    memory.set_xlabel("memory (GiB)", fontsize=8)
    memory.legend(fontsize=7, loc="lower right")
    title = f"{plan.ensemble}: {plan.predicted_throughput:,.0f} samples/s predicted"
    if plan.shares and plan.full_ensemble_throughput is not None:
        title += f" with the cascade ({plan.full_ensemble_throughput:,.0f} for the full ensemble)"
    if plan.latency_target_ms:
        title += f", latency target {plan.latency_target_ms:g} ms"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
