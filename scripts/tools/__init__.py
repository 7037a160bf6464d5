"""What only a person runs, never a config: benchmarks (`benchmark_guard`, `benchmark_loader`), host-sync counting
(`sync_count`, `count_train_syncs`), the fault matrix (`fault_matrix`) and the fault injectors it adds to a run
(`faults`), plots (`plot_training`), and LUNA16's 10-fold protocol as one command (`luna16_folds`)."""
