"""Serving esolm models: the continuous-batching engine (:mod:`esolm.serving.engine`)."""

from esolm.serving.engine import CompletionRequest, Engine, Finished, QueueFull, StepEvent

__all__ = ["CompletionRequest", "Engine", "Finished", "QueueFull", "StepEvent"]
