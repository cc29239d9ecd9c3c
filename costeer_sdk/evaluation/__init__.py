"""`costeer eval`: the paper's tasks, baselines and metrics over the SDK's own code path."""

from costeer_sdk.evaluation.metrics import copies_history, score
from costeer_sdk.evaluation.report import summarize, write_report
from costeer_sdk.evaluation.runner import METHODS, Evaluator, RunLog, RunSettings
from costeer_sdk.evaluation.tasks import (
    LONGLAMP_FORMATS,
    PREFERENCE_ATTRIBUTES,
    TASK_NAMES,
    CoGenesis,
    Example,
    LongLaMP,
    LongLaMPFormat,
    LongLaMPLeaveOneOut,
    Preference,
    Task,
    make_task,
)

__all__ = [
    "LONGLAMP_FORMATS",
    "METHODS",
    "PREFERENCE_ATTRIBUTES",
    "TASK_NAMES",
    "CoGenesis",
    "Evaluator",
    "Example",
    "LongLaMP",
    "LongLaMPFormat",
    "LongLaMPLeaveOneOut",
    "Preference",
    "RunLog",
    "RunSettings",
    "Task",
    "copies_history",
    "make_task",
    "score",
    "summarize",
    "write_report",
]
