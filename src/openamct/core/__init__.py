"""The native core: typed configs, one traced capture of the model, the calibration/simulation model, the
quantizers and the algorithms. It knows nothing of AMCT's files (amct/) or of ONNX (onnx_export/)."""
