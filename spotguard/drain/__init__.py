"""How a drain is planned and run: named steps under the notice's deadline.

    steps = plan(config)
    engine = DrainEngine(steps, ctx, timeline=persisted_or_none, on_change=persist)
    timeline = await engine.run()        # engine.tighten(earlier_deadline) from another task on a 2nd notice
"""

from spotguard.drain.engine import DrainEngine, check_plan
from spotguard.drain.plan import STEP_NAMES, plan
from spotguard.drain.step import DrainContext, Step, StepResult, step_time_left
from spotguard.drain.timeline import StepRecord, Timeline, TimelineError

__all__ = ["DrainContext", "DrainEngine", "STEP_NAMES", "Step", "StepRecord", "StepResult", "Timeline",
           "TimelineError", "check_plan", "plan", "step_time_left"]
