"""The guard room: the event policy (`stability_guard`: skip, roll back, stop) and the LR policy (`lr_policy`: the LR
check, the search after a rollback, growth, stalls), with their parts: the last good state (`snapshot`), the LR
multiplier (`lr_control`), paired LR trials (`lr_search`), the learning signal (`learning_signal`), the window of
applied steps and the loss-spike limit (`window`), the end-of-run verdict (`verdict`), per-file blame (`blame`), the
event log and report (`log`), and the training monitor (`monitor`)."""
