"""The examples' hooks and agent adapters, with a worker that dies once right
after the triage's classify state committed (on entering `route`)."""

import os
import signal

from flatmachines import HooksRegistry

from examples.app import TriageHooks, agent_adapters  # noqa: F401 - the worker reads it


class DiesOnceAfterClassify(TriageHooks):
    def on_state_enter(self, state_name, context):
        marker = os.environ.get("ORCH_TEST_DIE_ONCE")
        if state_name == "route" and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return context


hooks_registry = HooksRegistry()
hooks_registry.register("triage", DiesOnceAfterClassify)
