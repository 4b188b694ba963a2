"""Everything the simulator imports stays free of torch (only `deepflow sim calibrate` loads the engine)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import deepflow.sim.simulation, deepflow.sim.te, deepflow.sim.runner, deepflow.sim.workload
import deepflow.sim.report, deepflow.sim.cli, deepflow.sim.costmodel, deepflow.sim.events
import deepflow.cli
from deepflow.sim.simulation import SimConfig, Simulation
from deepflow.sim.workload import WorkloadSpec
spec = WorkloadSpec(kind="multi-turn", rate=0.5, duration_s=5, input_len=32, output_len=8, prefix_len=64,
                    num_turns=2)
result = Simulation(SimConfig(num_tes=2), spec).run()
assert result.summary.completed > 0, result.summary
assert 'torch' not in sys.modules, 'torch was imported'
print('ok')
"""


def test_simulator_never_imports_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
