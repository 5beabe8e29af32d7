"""Tasks (data loading, splits, tokenisation) and metrics."""
from dynatune.data.metrics import (LOWER_IS_BETTER, classification_metrics, evaluate,
                                   regression_metrics)
from dynatune.data.tasks import (TASKS, DataConfig, PadCollator, TaskData, load_task,
                                 task_descriptions, task_kind, task_names)

__all__ = ["DataConfig", "TaskData", "PadCollator", "TASKS", "load_task", "task_names",
           "task_descriptions", "task_kind", "evaluate", "classification_metrics", "regression_metrics",
           "LOWER_IS_BETTER"]
