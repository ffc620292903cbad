"""The memory planner: what each rank of a layout holds, whether it fits a device, and which layouts do.

docs/memory.md states the model and every assumption; bench/memory_planner.py checks it against
measured peaks.
"""

from nxdt.plan.devices import DEVICES, Device, device
from nxdt.plan.estimate import Facts, Layout, RankMemory
from nxdt.plan.planner import MemoryPlan, facts_of, layout_of, plan_memory, snapshot_of
from nxdt.plan.report import describe_plan, lines, machine_plan

__all__ = [
    "DEVICES",
    "Device",
    "Facts",
    "Layout",
    "MemoryPlan",
    "RankMemory",
    "describe_plan",
    "device",
    "facts_of",
    "layout_of",
    "lines",
    "machine_plan",
    "plan_memory",
    "snapshot_of",
]
