"""The data room, in the order a case meets it: the datalist (`datalist`) and its model-selection images
(`selection`), the data check (`check`, with its per-case
rules in `rules`, header-first image reading in `probe`, the findings in `report`) and its policies (`screening`),
the list of quarantined files and the sampler that skips them (`quarantine`), the persistent cache of compact
volumes (`cache`), the number of loader workers (`workers`), the crop (`crop`), augmentation (`augment`), and the
synthetic chest phantoms that are the bundle's default data (`phantoms`, drawn with `phantom_geometry`). The LUNA16
download: its tables (`luna16_csv`), MetaImage headers (`metaimage`), its preparation into resampled NIfTI and fold
datalists (`luna16_prepare`), and tiny LUNA16-layout phantom sets for tests (`luna16_phantoms`)."""
