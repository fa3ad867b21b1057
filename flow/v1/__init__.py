"""Generated code of the wire protocol `flow.v1` (protos/flow/v1/). Regenerate with
`python protos/generate.py`; never edit the *_pb2* files by hand."""
