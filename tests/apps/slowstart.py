"""An app whose import waits for a go-ahead: a command that loads it is held in
its start-up for as long as a test likes. It says it is there by writing its pid
to $ORCH_TEST_STARTING, and goes on once the file $ORCH_TEST_GO exists."""

import os
import time
from pathlib import Path

from flatmachines import HooksRegistry

Path(os.environ["ORCH_TEST_STARTING"]).write_text(str(os.getpid()))
while not Path(os.environ["ORCH_TEST_GO"]).exists():
    time.sleep(0.02)

hooks_registry = HooksRegistry()
