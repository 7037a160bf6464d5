"""The inference room: inputs, network loading and the result file (`io`), the image-by-image run (`run`) and
previews (`previews`)."""
