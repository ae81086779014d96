"""A real EngineCore whose steps sleep first (keeps requests mid-stream for kill tests); a core
factory for ProcessClient/RayClient: "testkit.slow_core:slow_engine_core"."""
from __future__ import annotations

import time


def slow_engine_core(model: str, step_delay_s: float = 0.0, **engine_kwargs):
    from pagedray.cluster.core.engine_core import EngineCore
    core = EngineCore.from_kwargs(model, **engine_kwargs)
    real = core.step

    def slow():
        time.sleep(step_delay_s)
        return real()

    core.step = slow
    return core
