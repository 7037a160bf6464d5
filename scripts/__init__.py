"""The Python the configs name, in rooms along the data's path: `data` (datalist, check, cache, crop, augmentation,
phantoms), `detection` (detector, training step, schedule), `guard` (the stability policies and their parts),
`evaluation`, `inference`, and `tools` (benchmarks, the fault matrix, plots: run by a person, named by no config).
Small helpers shared by all stay here: `errors`, `json_io`, `distributed`, `components` (the configs' factories)."""
