"""The detection room: the detector (`detector`, MONAI's RetinaNet with the zoo's state-dict keys) and its training
targets and losses without host syncs (`targets`, `sync_free_losses`, `sync_free_heads`), the stabilised training
step (`trainer`) and the record it reports each iteration (`step_report`), the LR schedule (`schedule`) and the
run-cost estimate printed at the start of training (`run_cost`)."""
