"""Bridges to other tools: :mod:`esolm.integrations.lm_eval` (EleutherAI's lm-evaluation-harness, the
``esolm`` model) and its offline task pack in ``lm_eval_tasks/`` (:data:`TASKS_DIR`)."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"

__all__ = ["TASKS_DIR"]
