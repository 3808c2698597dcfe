"""The emotion-recognition task: prompts, label scoring, calibration and metrics, and `Task`, which
ties them to one model and one dataset."""

from .prompts import PromptBuilder, Template
from .task import Task, TaskConfig

__all__ = ["PromptBuilder", "Task", "TaskConfig", "Template"]
