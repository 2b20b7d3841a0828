"""From a PyTorch model to the ONNX graph every engine is built from: the model built (models), exported
(onnx), checked (validate); detectors wrapped with NMS in the graph (detection); facts about the graph (graphs)."""
