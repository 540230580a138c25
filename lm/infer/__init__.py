"""Batched inference: an engine with paged K/V, continuous batching and streamed tokens
(engine.py), its page pool (pages.py) and jitted steps (steps.py). docs/inference.md."""

from lm.infer.engine import Completion, Engine, Event, Request, Result  # noqa: F401
