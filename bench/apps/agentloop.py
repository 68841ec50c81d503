"""W9's agent loop: the answer one turn produces, and the hooks that append it.

``answer(key, turn)`` is 2,048 bytes of English-like text: sentences of words
drawn from a fixed vocabulary of a few hundred words, seeded by the execution's
key and the turn, so every turn's answer is different, the same on every run,
and compresses roughly as a language model's answer does (not a repeated
character). The DBOS peer returns the same text from its step.

``AgentLoopHooks`` (registered as ``agent`` in benchapp's registry): the action
``answer`` appends the next answer to ``context.history`` and counts the turn.
With ``BENCH_W9_HOLD_DIR`` set in the worker's environment, the last turn writes
a marker file named after the key there and then waits an hour instead of
answering: the harness kills the worker while every execution is in its last
turn, with every earlier turn committed.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from flatmachines import MachineHooks

ANSWER_BYTES = 2048
HOLD_ENV = "BENCH_W9_HOLD_DIR"

VOCABULARY = """
a about above according accuracy across action actually add additional address after
again against agent algorithm all allow already also alternative although always an
analysis and answer any api application approach appropriate are argument around as
ask assume at available avoid back based be because before behaviour being below best
better between both build but by cache call can case cause certain change check choose
clear code common compare complete complex condition configuration consider constraint
context could create current data database default define depend describe design detail
different directly do does each easy edge effect either element else end ensure error
even event every example exception expect explain fact fail fast feature field file
first fix follow for format from function further general get give given good handle
has have here high how however if important improve in include index information input
instance instead into is issue it its just keep key know large last later layer least
let level library like likely limit line list load local long look loop main make many
may mean memory method might model more most much must need network new next no node
not note now number object of often on once one only option or order other our out
output over parameter part particular pass path pattern performance point possible
potential practice prefer previous problem process produce provide query question quite
rather read reason record reduce request require result return right risk run same save
second section see server set several should show side signal simple since single size
small so solution some source specific start state step still store string structure
such suggest support sure system table take task test than that the their them then
there these they thing think this those through time to token tool trade-off true try
type under understand until update use user usually value version very want way we well
what when where whether which while why will with within without work worker would
write you your
""".split()


def answer(key: str, turn: int, size: int = ANSWER_BYTES) -> str:
    """Exactly ``size`` ASCII characters of sentences and paragraphs."""
    rng = random.Random(f"{key}:{turn}")
    parts: list[str] = []
    length = 0
    while length < size:
        words = rng.choices(VOCABULARY, k=rng.randint(7, 22))
        if len(words) > 9 and rng.random() < 0.4:
            words[rng.randint(3, len(words) - 4)] += ","
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(".....?:")
        sep = "\n\n" if parts and rng.random() < 0.15 else " "
        piece = (sep if parts else "") + sentence
        parts.append(piece)
        length += len(piece)
    return "".join(parts)[:size]


class AgentLoopHooks(MachineHooks):
    async def on_action(self, state_name, action_name, context):
        if action_name != "answer":
            raise ValueError(f"agent-loop hooks have no action '{action_name}'")
        turn = int(context.get("turn") or 0) + 1
        turns = int(context["turns"])
        hold = os.environ.get(HOLD_ENV)
        if hold and turn == turns:
            (Path(hold) / str(context["key"])).write_text(str(turn))
            await asyncio.sleep(3600)
        text = answer(str(context["key"]), turn)
        context.setdefault("history", []).append(text)
        context["turn"] = turn
        context["chars"] = int(context.get("chars") or 0) + len(text)
        context["more"] = turn < turns
        return context
