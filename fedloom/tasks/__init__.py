"""Tasks: how a batch of model outputs becomes a loss, and the metrics evaluation reports.

A task gives, for a batch, every example's loss as a (sum, count) pair: a
classifier's example counts once, a language model's sequence counts its real
(non-padded) tokens. The mean loss of a batch is the sum of sums over the sum
of counts, so a padded batch (the vectorized engine's short batches, padded
targets) gives exactly the loss of its real part. Metrics come the same way and
are pooled over the evaluation set the same way; ``finish`` derives what is not
a mean (perplexity). Engines and evaluation take the loss from the task;
nothing else in fedloom knows cross-entropy.
"""

from .base import IGNORE, TASKS, Classification, LanguageModel, Regression, Task, UserTask, build_task, mean_loss

__all__ = ["IGNORE", "TASKS", "Classification", "LanguageModel", "Regression", "Task", "UserTask", "build_task",
           "mean_loss"]
