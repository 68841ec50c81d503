"""Exceptions with a meaning in the domain."""


class OrchError(Exception):
    """Base class for orchestrator errors."""


class UserError(OrchError):
    """A mistake the user can fix; the CLI prints it as one line and exits 2."""


class ExecutionNotFound(UserError):
    def __init__(self, execution_id: str):
        super().__init__(f"no execution with id '{execution_id}' (see `orch list`)")
        self.execution_id = execution_id


class LeaseLost(OrchError):
    """The claim's fence moved on: another worker owns the execution now.

    Raised from a fenced write; the worker abandons the execution without
    writing anything more.
    """

    def __init__(self, execution_id: str, fence: int):
        super().__init__(
            f"lease lost on execution {execution_id} (fence {fence} is no longer current)"
        )
        self.execution_id = execution_id
        self.fence = fence


class StoreUnavailable(OrchError):
    """The store did not answer: down, restarting, unreachable, read-only, or
    locked past every retry. Never the workflow's error: the worker abandons the
    run without writing more, and it resumes from its last committed checkpoint
    once the store answers. The CLI prints the message and exits 2.

    ``uncertain``: the connection failed while a write was committing, so it
    may or may not have committed; the caller must read before it assumes.
    """

    def __init__(self, message: str, *, uncertain: bool = False):
        super().__init__(message)
        self.uncertain = uncertain


class WaitTimeout(OrchError):
    """A wait for an execution gave up before it finished."""

    def __init__(self, execution):
        super().__init__(f"execution {execution.id} still {execution.status}")
        self.execution = execution
