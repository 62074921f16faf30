"""Publishing: atomic saving (`saving`), the compression report and Hub push (`publish`), the model card
(`card`), search plots and tables (`report`), folder verification (`verify`), ONNX export and evaluation metrics.
Reads a finished run; never imported by a method."""
