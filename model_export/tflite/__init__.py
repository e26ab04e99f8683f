"""TFLite files as PyTorch: `reader` (flatbuffer -> tensors, operators), `ops` (operators -> one nn.Module),
`reference` (LiteRT on the same file, and the rule exported detections are held to against it)."""
