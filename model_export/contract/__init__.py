"""The model contract, shared by the exporter and the server: pure Python and numpy, no torch, no server.

- `metadata`: the description an exported file carries about itself (`ModelMetadata`), stored as JSON under one metadata key
  of the ONNX model (`METADATA_KEY`) and repeated for people in a sidecar `<file>.json`; a TensorRT engine gets
  the same JSON beside it, with the build facts added;
  and the tensor names (`INPUT_NAME`, `OUTPUT_NAMES`; DESIGN.md "The model contract");
- `image`: the input: any decoded, EXIF-oriented PIL image -> uint8 [H, W, 3] RGB at the model's input size (`model_input`:
  `to_rgb`, then `resize_bilinear`: bilinear, half-pixel centres, no antialiasing). Validation feeds the exported
  model exactly these pixels, and the server feeds it the same.

- `engine`: a TensorRT engine's description (build facts, batch profile); `cuda`: which GPU this is (cuda-python,
  imported on first use); `cpu`: which CPU this is, and the ONNX Runtime option that keeps integer exports exact
  on x86 without VNNI (`exact_integer_options`, `exact_session`); `errors`: `ContractError`, the one-line error
  base both sides share.

Imports go one way: `model_export` never imports `server`, and `server` imports only this module from
`model_export` (tests/test_import_direction.py). Its modules import nothing else of the project.
"""
