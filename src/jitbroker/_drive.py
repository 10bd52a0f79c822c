"""Run an operation written once as a generator, against a sync or an async store.

Broker logic is written as generators that ``yield`` store calls (a function
taking the store) and receive the results. ``run`` makes plain calls and
``arun`` awaits them: only the waiting differs between Broker and AsyncBroker.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
Step = Callable[[Any], Any]
Steps = Generator[Step, Any, T]


def run(steps: Steps[T], store: Any) -> T:
    """Drive ``steps`` with synchronous calls on ``store``."""
    try:
        step = next(steps)
        while True:
            try:
                result = step(store)
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun(steps: Steps[T], store: Any) -> T:
    """Drive ``steps`` awaiting each call on the async ``store``."""
    try:
        step = next(steps)
        while True:
            try:
                result = step(store)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
