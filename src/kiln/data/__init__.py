"""What goes into a model: images and their preprocessing, other inputs, the calibration set, the fp32 reference file, demo weights."""
