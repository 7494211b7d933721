"""What one line of ``metrics.jsonl`` (and one entry of ``FitResult.history``) holds, in order, for an epoch
that was evaluated: the tests of ``fit``, the loop and the command line all expect these keys."""

HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "eval_s",
    "images_per_s",
    "wall_s",
)
