"""Generated containerd API stubs. Do not edit; run scripts/gen-protos.

The sources are in spegeld/containerd/protos/spegeld/containerd/_gen/.
"""
